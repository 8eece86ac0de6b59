"""Run untrusted Python programs against test cases: a small interface and a local subprocess sandbox.

A :class:`Sandbox` turns ``(program, tests)`` into one :class:`Result` per test. Two kinds of test:

* **stdin/stdout** (``Test(input="1 2\\n", output="3\\n")``): the program reads ``input`` on stdin;
  it passes when it exits 0 and its stdout equals ``output`` up to trailing whitespace per line and
  blank lines at the end;
* **assert-style** (``Test(check="assert add(1, 2) == 3")``): the program runs as ``__main__``, then
  ``check`` runs in its namespace; it passes when ``check`` raises nothing.

:class:`LocalSandbox` (the default) runs each test in its own subprocess:

* a fresh scratch directory (``tempfile``) as working directory, ``HOME`` and ``TMPDIR``, removed
  afterwards; a minimal environment (nothing of the caller's: no ``CUDA_*``, no ``MASTER_ADDR``);
* limits set in the forked child before any of the program runs (``resource.setrlimit``):
  address space (``memory_mb``), CPU seconds, size of any file written (``max_output_bytes``: this
  also caps stdout and stderr, which go to files), processes (``max_processes``, when the program
  runs as an unprivileged user), no core dumps;
* a wall-clock ``timeout``; the test runs in a new process group (a new session), killed whole
  (``SIGKILL``) on timeout and after every run, so the program's children die too;
* where ``unshare`` works (root, or unprivileged user namespaces) the test runs in new network and
  PID namespaces: no network interface but loopback, and every process the program started dies
  when the test ends, even one that left the process group; in any case, before a result is
  returned, a sweep kills (and waits out) every process carrying the test's marker in its environment;
* run as root, the program drops to user ``nobody``: it cannot write outside its scratch directory
  except into world-writable ones (``/tmp``, ``/dev/shm``).

It isolates honest mistakes and reward-hacking accidents (infinite loops, memory blow-ups, fork
storms, stray files, megabytes of output), not a determined attacker: for that, plug a remote
sandbox (E2B, Piston, a container service) through :class:`Sandbox`.

>>> box = LocalSandbox(timeout=5)
>>> [r.status for r in box.run("print(sum(map(int, input().split())))",
...                            [Test(input="1 2\\n", output="3\\n"), Test(input="2 2\\n", output="5\\n")])]
['pass', 'fail']

Size: the interface, the limits, the subprocess runner and the classification of what happened
are one security boundary, read and reviewed together.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

PASS, FAIL, TIMEOUT, CRASH, MEMORY = "pass", "fail", "timeout", "crash", "memory"
STATUSES = (PASS, FAIL, TIMEOUT, CRASH, MEMORY)

_ASSERT_FAILED = 3  # exit code of the harness when a check raises AssertionError
_CHECK_PASSED = 97  # exit code of the harness after every check ran (a plain exit 0 is not a pass)
_MARKER = "INTRINSIC_SANDBOX_ID"


@dataclass(frozen=True)
class Test:
    """One test: stdin ``input`` and expected stdout ``output``, or an assert-style ``check``."""

    __test__ = False  # not a pytest class

    input: str = ""
    output: str | None = None
    check: str | None = None

    def __post_init__(self):
        if (self.output is None) == (self.check is None):
            raise ValueError("a test has either an expected `output` (stdin/stdout) or a `check` (assert-style)")


@dataclass(frozen=True)
class Result:
    """What one test gave: ``status`` (pass, fail, timeout, crash, memory), a short ``detail``, the
    program's stdout (at most ``max_output_bytes``) and stderr tail, its exit code and wall time."""

    status: str
    detail: str = ""
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASS


def outputs_match(got: str, expected: str) -> bool:
    """Stdout equality up to trailing whitespace per line and trailing blank lines (judges' default).

    >>> outputs_match("3 \\n4\\n\\n", "3\\n4"), outputs_match("3\\n4", "3 4")
    (True, False)
    """
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.replace("\r\n", "\n").rstrip().split("\n")]

    return lines(got) == lines(expected)


def parse_tests(value) -> list[Test]:
    """Tests from a dataset cell: a JSON string or a list whose items are ``{"input", "output"}``
    (stdin/stdout; LiveCodeBench's ``testtype: stdin`` rows), ``{"check": ...}`` / ``{"assert": ...}``
    or a plain string (assert-style). A string that is not JSON is one assert-style check (MBPP's and
    HumanEval's test code).

    >>> parse_tests('[{"input": "1\\\\n", "output": "2\\\\n"}, "assert f(1) == 2"]')
    [Test(input='1\\n', output='2\\n', check=None), Test(input='', output=None, check='assert f(1) == 2')]
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [Test(check=value)]
        if isinstance(value, str):
            return [Test(check=value)]
    if not isinstance(value, list | tuple):
        raise ValueError(f"tests must be a list (or its JSON), got {type(value).__name__}")
    tests = []
    for item in value:
        if isinstance(item, str):
            tests.append(Test(check=item))
        elif isinstance(item, dict) and ("check" in item or "assert" in item):
            tests.append(Test(check=str(item.get("check", item.get("assert")))))
        elif isinstance(item, dict) and "output" in item:
            if item.get("testtype", "stdin") != "stdin":
                raise ValueError(f"unsupported test type {item['testtype']!r} (stdin/stdout and assert-style only)")
            tests.append(Test(input=str(item.get("input", "")), output=str(item["output"])))
        else:
            raise ValueError(f"a test is a {{input, output}} mapping or an assert string, got {item!r:.80}")
    return tests


class Sandbox(ABC):
    """Where programs run. Implement :meth:`run`; :meth:`run_many` runs several programs (override it
    to batch requests to a remote service)."""

    @abstractmethod
    def run(self, program: str, tests: Sequence[Test]) -> list[Result]:
        """One :class:`Result` per test, in order."""

    def run_many(self, jobs: Sequence[tuple[str, Sequence[Test]]]) -> list[list[Result]]:
        return [self.run(program, tests) for program, tests in jobs]


# The process that runs under ``unshare`` (PID 1 of its namespace when there is one): it forks the
# test, which sets its limits, drops privileges and runs the program; it waits and writes the
# test's wait status and resource usage to the status pipe, which the test itself never holds.
_SUPERVISOR = r"""
import os, resource, sys, traceback, types
status_fd, mem, cpu, fsize, nproc, uid, gid = (int(x) for x in sys.argv[1:8])
check = sys.argv[8]
pid = os.fork()
if pid == 0:
    os.close(status_fd)
    code = 1
    try:
        def limit(kind, value):
            if value > 0:
                resource.setrlimit(kind, (value, value))
        limit(resource.RLIMIT_AS, mem)
        limit(resource.RLIMIT_FSIZE, fsize)
        limit(resource.RLIMIT_NPROC, nproc)
        if cpu > 0:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid >= 0:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        sys.argv = ["main.py"]
        module = types.ModuleType("__main__")
        module.__file__ = "main.py"
        sys.modules["__main__"] = module
        try:
            exec(compile(open("main.py").read(), "main.py", "exec"), module.__dict__)
        except SystemExit as stop:
            if not check or stop.code not in (None, 0):
                raise
        if check:
            try:
                exec(compile(open("check.py").read(), "<check>", "exec"), module.__dict__)
            except AssertionError:
                traceback.print_exc()
                code = %(failed)d
            else:
                code = %(passed)d
        else:
            code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code & 255)
_, status, usage = os.wait4(pid, 0)
os.write(status_fd, ("%%d %%r %%d" %% (status, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)).encode())
os._exit(0)
""" % {"failed": _ASSERT_FAILED, "passed": _CHECK_PASSED}

_NAMESPACES: list[str] | None = None
_NAMESPACES_LOCK = threading.Lock()


def namespace_prefix() -> list[str]:
    """The ``unshare`` command that gives a test new network and PID namespaces here, or ``[]`` where
    none works (probed once per process: as root, then through a user namespace)."""
    global _NAMESPACES
    with _NAMESPACES_LOCK:
        if _NAMESPACES is None:
            _NAMESPACES = []
            unshare = shutil.which("unshare")
            candidates = [[unshare, "--net", "--pid", "--fork", "--kill-child"],
                          [unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]]
            for prefix in candidates if unshare else []:
                try:
                    ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    ok = False
                if ok:
                    _NAMESPACES = prefix
                    break
        return list(_NAMESPACES)


_DROP: dict[str, tuple[int, int]] = {}


def unprivileged_ids(python: str = sys.executable) -> tuple[int, int]:
    """``nobody``'s uid and gid when this process is root and ``python`` still imports its standard
    library as ``nobody`` (the program then drops to them), else ``(-1, -1)``: an interpreter
    installed under a private home (``/root/.pyenv``) cannot import ``socket`` once privileges drop,
    so there the program runs as the caller (probed once per interpreter)."""
    with _NAMESPACES_LOCK:
        if python not in _DROP:
            ids = (-1, -1)
            if os.geteuid() == 0:
                try:
                    entry = pwd.getpwnam("nobody")
                    probe = (f"import os; os.setgroups([]); os.setgid({entry.pw_gid}); os.setuid({entry.pw_uid}); "
                             "import socket, decimal, json, heapq, bisect, fractions, itertools, collections")
                    ok = subprocess.run([python, "-I", "-c", probe], capture_output=True, timeout=30,
                                        cwd="/").returncode == 0
                    ids = (entry.pw_uid, entry.pw_gid) if ok else ids
                except (KeyError, OSError, subprocess.SubprocessError):
                    pass
            _DROP[python] = ids
        return _DROP[python]


def _kill_marked(marker: str) -> int:
    """SIGKILL every live process whose environment carries ``marker`` (Linux ``/proc``; best effort);
    how many there were (a zombie's environment reads empty: it does not count)."""
    needle, found = f"{_MARKER}={marker}".encode(), 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(entry), signal.SIGKILL)
                    found += 1
        except (OSError, ValueError):
            continue
    return found


def _reap_marked(marker: str, patience: float = 5.0) -> None:
    """Kill the test's leftover processes until none is alive (a PID namespace's teardown, which the
    kernel runs after its first process exits, is waited for too)."""
    deadline = time.monotonic() + patience
    while _kill_marked(marker) and time.monotonic() < deadline:
        time.sleep(0.01)


def _read_capped(path: str, limit: int, tail: bool = False) -> tuple[str, int]:
    """At most ``limit`` bytes of a file (its end with ``tail``) as text, and the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if tail and size > limit:
            f.seek(size - limit)
        return f.read(limit).decode("utf-8", errors="replace"), size


class LocalSandbox(Sandbox):
    """Each test in its own subprocess with limits, a scratch directory and (where the OS allows it)
    no network; ``workers`` tests run at once (threads waiting on subprocesses)."""

    def __init__(self, timeout: float = 6.0, memory_mb: int = 1024, cpu_seconds: int | None = None,
                 max_output_bytes: int = 1 << 20, max_processes: int | None = 256, workers: int = 4,
                 isolate: bool = True, python: str | None = None, scratch_root: str | None = None):
        if timeout <= 0 or memory_mb <= 0 or max_output_bytes <= 0 or workers < 1:
            raise ValueError("timeout, memory_mb, max_output_bytes must be positive and workers >= 1")
        self.timeout, self.memory_mb, self.max_output_bytes = float(timeout), int(memory_mb), int(max_output_bytes)
        self.cpu_seconds = int(cpu_seconds) if cpu_seconds else math.ceil(self.timeout) + 1
        self.max_processes, self.workers, self.isolate = max_processes, int(workers), isolate
        self.python, self.scratch_root = python or sys.executable, scratch_root

    def run(self, program: str, tests: Sequence[Test]) -> list[Result]:
        return self.run_many([(program, tests)])[0]

    def run_many(self, jobs: Sequence[tuple[str, Sequence[Test]]]) -> list[list[Result]]:
        flat = [(j, program, test) for j, (program, tests) in enumerate(jobs) for test in tests]
        out: list[list[Result]] = [[] for _ in jobs]
        if not flat:
            return out
        with ThreadPoolExecutor(max_workers=min(self.workers, len(flat))) as pool:
            results = list(pool.map(lambda item: self.run_test(item[1], item[2]), flat))
        for (j, _, _), result in zip(flat, results):
            out[j].append(result)
        return out

    def run_test(self, program: str, test: Test) -> Result:
        """One test in a fresh scratch directory, removed afterwards."""
        scratch = tempfile.mkdtemp(prefix="intrinsic-sandbox-", dir=self.scratch_root)
        try:
            return self._run_in(scratch, program, test)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _run_in(self, scratch: str, program: str, test: Test) -> Result:
        uid, gid = unprivileged_ids(self.python)
        work = os.path.join(scratch, "work")  # the program's directory; the rest of scratch is ours
        os.mkdir(work)
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(program)
        if test.check is not None:
            with open(os.path.join(work, "check.py"), "w") as f:
                f.write(test.check)
        with open(os.path.join(scratch, "stdin"), "w") as f:
            f.write(test.input)
        if uid >= 0:
            os.chmod(scratch, 0o711)
            os.chown(work, uid, gid)
        marker = uuid.uuid4().hex
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", _MARKER: marker}
        prefix = namespace_prefix() if self.isolate else []
        read_status, write_status = os.pipe()
        command = [*prefix, self.python, "-I", "-c", _SUPERVISOR, str(write_status), str(self.memory_mb << 20),
                   str(self.cpu_seconds), str(self.max_output_bytes), str((self.max_processes or 0) if uid >= 0 else 0),
                   str(uid), str(gid), "1" if test.check is not None else ""]
        paths = {name: os.path.join(scratch, name) for name in ("stdin", "stdout", "stderr")}
        start, timed_out = time.monotonic(), False
        try:
            with open(paths["stdin"], "rb") as stdin, open(paths["stdout"], "wb") as stdout, \
                    open(paths["stderr"], "wb") as stderr:
                proc = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr, cwd=work, env=env,
                                        start_new_session=True, pass_fds=(write_status,))
            os.close(write_status)
            write_status = -1
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the group: the program's children too
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                _reap_marked(marker)
            seconds = time.monotonic() - start
            with os.fdopen(read_status, "rb") as f:
                read_status = -1
                report = f.read().decode().split()
        finally:
            for fd in (read_status, write_status):
                if fd >= 0:
                    os.close(fd)
        stdout, out_size = _read_capped(paths["stdout"], self.max_output_bytes)
        stderr, _ = _read_capped(paths["stderr"], 4096, tail=True)
        return self._classify(test, report, timed_out, seconds, stdout, out_size, stderr)

    def _classify(self, test: Test, report: list[str], timed_out: bool, seconds: float, stdout: str,
                  out_size: int, stderr: str) -> Result:
        def result(status: str, detail: str, code: int | None = None) -> Result:
            return Result(status, detail, stdout, stderr, code, seconds)

        if timed_out:
            return result(TIMEOUT, f"over {self.timeout:g} s wall clock")
        if len(report) != 3:
            return result(CRASH, "the sandbox supervisor died")
        status, cpu = int(report[0]), float(report[1])
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= self.cpu_seconds):
                return result(TIMEOUT, f"over {self.cpu_seconds} CPU seconds", -sig)
            if sig == signal.SIGXFSZ or out_size >= self.max_output_bytes:
                return result(FAIL, f"output or a file over {self.max_output_bytes} bytes", -sig)
            if sig == signal.SIGKILL:
                return result(MEMORY, "killed (out of memory?)", -sig)
            return result(CRASH, f"killed by {signal.Signals(sig).name}", -sig)
        code = os.WEXITSTATUS(status)
        if out_size >= self.max_output_bytes or "File too large" in stderr:
            return result(FAIL, f"output or a file over {self.max_output_bytes} bytes", code)
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            return result(MEMORY, f"over {self.memory_mb} MiB", code)
        if test.check is not None:
            if code == _CHECK_PASSED:
                return result(PASS, "", 0)
            if code == _ASSERT_FAILED:
                return result(FAIL, "assertion failed", code)
            return result(CRASH, f"exit code {code}" if code else "exited before its checks ran", code)
        if code != 0:
            return result(CRASH, f"exit code {code}", code)
        if outputs_match(stdout, test.output or ""):
            return result(PASS, "", 0)
        return result(FAIL, "wrong output", 0)
