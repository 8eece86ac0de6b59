"""The local code sandbox: every way a program can end is classified, and nothing is left behind."""

from __future__ import annotations

import os
import uuid

import psutil
import pytest

from rewards.sandbox import LocalSandbox, Result, Sandbox, Test, namespace_prefix, parse_tests, unprivileged_ids

pytestmark = pytest.mark.timeout(60)

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture
def scratch_root(tmp_path):
    root = tmp_path / "scratch"
    root.mkdir()
    yield root
    assert not list(root.iterdir()), "a scratch directory was left behind"


def box(scratch_root, **kwargs) -> LocalSandbox:
    return LocalSandbox(**{"timeout": 2.0, "memory_mb": 256, "max_output_bytes": 1 << 16, "workers": 2,
                           "scratch_root": str(scratch_root), **kwargs})


def alive_with(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if token in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
            found.append(proc)
    return found


def test_stdin_tests_pass_and_fail(scratch_root):
    results = box(scratch_root).run(ADD, [Test("1 2\n", "3\n"), Test("5 5", "10"), Test("1 1\n", "3\n")])
    assert [r.status for r in results] == ["pass", "pass", "fail"]
    assert results[2].stdout == "2\n" and results[2].detail == "wrong output"


def test_assert_style_tests_pass_fail_and_exits(scratch_root):
    program = "def inc(x):\n    return x + 1\n"
    tests = [Test(check="assert inc(1) == 2"), Test(check="assert inc(1) == 3")]
    assert [r.status for r in box(scratch_root).run(program, tests)] == ["pass", "fail"]
    # sys.exit(0) at the end of a script still lets the checks run; os._exit skips them: not a pass
    exits = box(scratch_root).run_many([(program + "import sys\nsys.exit(0)\n", tests[:1]),
                                        (program + "import os\nos._exit(0)\n", tests[:1])])
    assert [r[0].status for r in exits] == ["pass", "crash"]


def test_crash_is_a_crash(scratch_root):
    result = box(scratch_root).run("raise ValueError('boom')", [Test("", "")])[0]
    assert result.status == "crash" and "ValueError: boom" in result.stderr and result.returncode == 1


def test_infinite_loop_times_out(scratch_root):
    results = box(scratch_root).run("while True:\n    pass\n", [Test("", "")])
    assert results[0].status == "timeout" and results[0].seconds < 5


def test_cpu_limit_stops_a_busy_program_before_the_wall_clock(scratch_root):
    # a generous wall clock: on a shared machine one CPU second can take several wall seconds
    result = box(scratch_root, timeout=30, cpu_seconds=1).run("while True:\n    pass\n", [Test("", "")])[0]
    assert result.status == "timeout" and "CPU" in result.detail


def test_memory_blowup_is_a_memory_error(scratch_root):
    result = box(scratch_root).run("x = bytearray(2_000_000_000)\nprint(len(x))\n", [Test("", "")])[0]
    assert result.status == "memory", result


def test_megabytes_of_output_are_capped(scratch_root):
    program = "import sys\nfor _ in range(10_000):\n    sys.stdout.write('x' * 1000)\n"
    result = box(scratch_root).run(program, [Test("", "x")])[0]
    assert result.status == "fail" and "bytes" in result.detail
    assert len(result.stdout) <= 1 << 16 and result.seconds < 5


def test_files_stay_in_the_scratch_directory(scratch_root, tmp_path):
    program = ("import os, tempfile\nopen('local.txt', 'w').write('x')\n"
               "tempfile.NamedTemporaryFile(delete=False).write(b'x')\n"
               "open(os.path.expanduser('~/home.txt'), 'w').write('x')\nprint(os.getcwd() != '/')\n")
    result = box(scratch_root).run(program, [Test("", "True")])[0]
    assert result.passed, result
    assert not list(tmp_path.glob("**/local.txt")) and not list(tmp_path.glob("**/home.txt"))
    # scratch_root's fixture asserts the scratch directory is gone


@pytest.mark.skipif(unprivileged_ids() == (-1, -1), reason="runs as the caller here (not root, or the "
                    "interpreter is unreadable to nobody): writes outside the scratch directory are not blocked")
def test_unprivileged_program_cannot_write_outside(scratch_root, tmp_path):
    target = tmp_path / "escaped.txt"
    result = box(scratch_root).run(f"open({str(target)!r}, 'w').write('x')", [Test("", "")])[0]
    assert result.status == "crash" and "PermissionError" in result.stderr and not target.exists()


@pytest.mark.parametrize("isolate", [True, False], ids=["namespaces", "process-group"])
def test_spawned_processes_die(scratch_root, isolate):
    if isolate and not namespace_prefix():
        pytest.skip("unshare does not work here")
    token = f"sandbox-child-{uuid.uuid4().hex}"
    program = ("import subprocess, sys\n"
               f"sleeper = [sys.executable, '-c', 'import time; time.sleep(60)', '{token}']\n"
               "subprocess.Popen(sleeper)\n"                               # same process group
               "subprocess.Popen(sleeper, start_new_session=True)\n"      # escapes the group
               "print('spawned')\n")
    results = box(scratch_root, isolate=isolate).run(program, [Test("", "spawned"), Test("", "spawned")])
    assert [r.status for r in results] == ["pass", "pass"], results
    assert alive_with(token) == []
    # on timeout too
    looping = program.replace("print('spawned')\n", "while True:\n    pass\n")
    assert box(scratch_root, isolate=isolate).run(looping, [Test("", "")])[0].status == "timeout"
    assert alive_with(token) == []


def test_no_network_where_namespaces_work(scratch_root):
    if not namespace_prefix():
        pytest.skip("unshare does not work here")
    program = "import socket\nsocket.create_connection(('127.0.0.2', 9), timeout=1)\n"
    result = box(scratch_root).run(program, [Test("", "")])[0]
    assert result.status == "crash" and ("unreachable" in result.stderr or "refused" in result.stderr)
    interfaces = box(scratch_root).run("import socket\nprint(sorted(n for _, n in socket.if_nameindex()))",
                                       [Test("", "['lo']")])[0]
    assert interfaces.passed, interfaces


def test_environment_is_minimal(scratch_root, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    program = "import os\nprint(sorted(k for k in os.environ if k.startswith(('MASTER', 'CUDA', 'RANK'))))\n"
    assert box(scratch_root).run(program, [Test("", "[]")])[0].passed


def test_parallel_runs_keep_order(scratch_root):
    jobs = [(ADD, [Test(f"{i} {i}", str(2 * i)), Test(f"{i} 0", str(i + 1))]) for i in range(6)]
    results = box(scratch_root, workers=3).run_many(jobs)
    assert [[r.status for r in rs] for rs in results] == [["pass", "fail"]] * 6


def test_parse_tests_formats():
    assert parse_tests([{"input": "1", "output": "2", "testtype": "stdin"}]) == [Test("1", "2")]
    assert parse_tests('["assert f() == 1", {"assert": "assert g()"}]') == [Test(check="assert f() == 1"),
                                                                            Test(check="assert g()")]
    assert parse_tests("assert f(1) == 2\nassert f(2) == 3") == [Test(check="assert f(1) == 2\nassert f(2) == 3")]
    with pytest.raises(ValueError, match="unsupported test type"):
        parse_tests([{"input": "[1]", "output": "2", "testtype": "functional"}])
    with pytest.raises(ValueError):
        parse_tests(3)
    with pytest.raises(ValueError):
        Test(input="1")


def test_a_remote_sandbox_plugs_in():
    class Echo(Sandbox):  # a stand-in for a remote service: every test fails with the program's length
        def run(self, program, tests):
            return [Result("fail", str(len(program))) for _ in tests]

    results = Echo().run_many([("ab", [Test("", "")]), ("abc", [Test("", "")])])
    assert [r.detail for rs in results for r in rs] == ["2", "3"]
