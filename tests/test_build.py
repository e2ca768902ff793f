"""The JIT build of the extension: a content-addressed cache, one compile per key at a time, and no kill that
leaves anything a later process waits on.

The build machinery works on any source folder; these tests drive it with a one-file extension (the Python C
API only, no torch headers: it compiles in a second) through a compiler wrapper that logs every compile and
can hold one back, so that a process can be killed while it compiles.
"""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mmfast import _build

TIMEOUT = 240  # seconds; a build that hangs fails the test instead of stalling it

TINY_SOURCE = """\
#include <Python.h>
#define TAG "{tag}"
#define INIT_NAME2(name) PyInit_##name
#define INIT_NAME(name) INIT_NAME2(name)
#define STRINGIFY2(x) #x
#define STRINGIFY(x) STRINGIFY2(x)
static struct PyModuleDef module_def = {{PyModuleDef_HEAD_INIT, STRINGIFY(TORCH_EXTENSION_NAME), nullptr, -1, nullptr}};
PyMODINIT_FUNC INIT_NAME(TORCH_EXTENSION_NAME)(void) {{
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) PyModule_AddStringConstant(module, "tag", TAG);
  return module;
}}
"""

# Logs each compile (not the link, nor the `--version` the cache key asks for), sleeps if asked, then compiles.
COMPILER_WRAPPER = """\
#!/bin/sh
case " $* " in
  *" -c "*) echo "$$" >> "$TINY_COMPILE_LOG"; sleep "${TINY_COMPILE_DELAY:-0}";;
esac
exec c++ "$@"
"""

# A process that builds (or loads) the tiny extension and prints its tag; "pause-before-publish" makes it stop
# between the end of the compile and the rename into the cache.
BUILD_PROCESS = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    from mmfast import _build

    source = Path(sys.argv[1])
    if sys.argv[2:] == ["pause-before-publish"]:
        def paused(temp, folder):
            print("compiled, not yet published", flush=True)
            time.sleep(600)
        _build._publish = paused
    module = _build.build_extension("tiny", source, [str(source / "tiny.cpp")], {}, with_cuda=False)
    print("tag", module.tag, flush=True)
""")


def _wait_for(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class TinyBuilds:
    """Checkouts of the tiny extension, a private cache, and build processes whose output lands in files."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.compile_log = root / "compiles.log"
        self.compiler = root / "bin" / "c++"
        self.compiler.parent.mkdir(parents=True)
        self.compiler.write_text(COMPILER_WRAPPER)
        self.compiler.chmod(self.compiler.stat().st_mode | stat.S_IEXEC)
        self.processes: list[subprocess.Popen] = []

    def env(self, compile_delay: float = 0) -> dict:
        return {"MMFAST_CACHE": str(self.cache), "CXX": str(self.compiler), "TINY_COMPILE_LOG": str(self.compile_log),
                "TINY_COMPILE_DELAY": str(compile_delay)}

    def checkout(self, tag: str) -> Path:
        source = self.root / f"checkout-{tag}" / "csrc"
        source.mkdir(parents=True)
        (source / "tiny.cpp").write_text(TINY_SOURCE.format(tag=tag))
        return source

    def start(self, source: Path, *args: str, compile_delay: float = 0) -> subprocess.Popen:
        n = len(self.processes)
        stdout, stderr = (open(self.root / f"{n}.{kind}", "w") for kind in ("out", "err"))
        process = subprocess.Popen([sys.executable, "-c", BUILD_PROCESS, str(source), *args],
                                   env={**os.environ, **self.env(compile_delay)}, stdout=stdout, stderr=stderr,
                                   start_new_session=True)  # its own group: teardown kills orphaned compilers too
        process.out, process.err = (self.root / f"{n}.{kind}" for kind in ("out", "err"))
        self.processes.append(process)
        return process

    def finish(self, process: subprocess.Popen) -> str:
        """The tag the process printed; a process that hangs or fails fails the test."""
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"build process hung for {TIMEOUT} s: {process.err.read_text()}")
        assert process.returncode == 0, process.err.read_text()
        return process.out.read_text().split("tag ")[-1].strip()

    def run(self, source: Path) -> str:
        return self.finish(self.start(source))

    def compiles(self) -> int:
        return len(self.compile_log.read_text().splitlines()) if self.compile_log.exists() else 0

    def build_folders(self) -> list[Path]:
        return sorted(p for p in self.cache.iterdir() if p.is_dir() and _build._TEMP_MARK not in p.name)

    def temp_folders(self) -> list[Path]:
        return sorted(self.cache.glob(f"*{_build._TEMP_MARK}*"))

    def kill_all(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


@pytest.fixture
def tiny(tmp_path):
    builds = TinyBuilds(tmp_path)
    yield builds
    builds.kill_all()


def test_each_checkout_loads_its_own_build_and_an_unchanged_tree_never_rebuilds(tiny, monkeypatch):
    for name, value in tiny.env().items():
        monkeypatch.setenv(name, value)
    a, b = tiny.checkout("A"), tiny.checkout("B")

    def build(source):
        return _build.build_extension("tiny", source, [str(source / "tiny.cpp")], {}, with_cuda=False)

    assert build(a).tag == "A"
    assert build(b).tag == "B"
    assert tiny.compiles() == 2 and len(tiny.build_folders()) == 2
    assert tiny.run(a) == "A"  # a fresh process with the same tree only loads
    assert tiny.compiles() == 2
    (a / "tiny.h").write_text("// any file under the source folder is part of the key\n")
    assert build(a).tag == "A"
    assert tiny.compiles() == 3 and len(tiny.build_folders()) == 3
    assert not tiny.temp_folders()


def test_two_processes_started_at_once_compile_once(tiny):
    source = tiny.checkout("A")
    # The compile is held back long enough for the second process to reach the lock while the first holds it.
    first, second = (tiny.start(source, compile_delay=3) for _ in range(2))
    assert tiny.finish(first) == "A" and tiny.finish(second) == "A"
    assert tiny.compiles() == 1


def test_a_waiting_process_names_the_holder_and_a_killed_waiter_leaves_nothing_behind(tiny, monkeypatch):
    source = tiny.checkout("A")
    for name, value in tiny.env().items():
        monkeypatch.setenv(name, value)
    folder = _build.build_folder("tiny", _build.build_key("tiny", source, [str(source / "tiny.cpp")], {}, False))
    tiny.cache.mkdir()
    with _build._build_lock(folder.with_name(folder.name + ".lock")):  # this test process is the holder
        doomed = tiny.start(source)
        _wait_for(lambda: "waiting" in doomed.err.read_text(), "the waiting message")
        message = doomed.err.read_text()
        assert f"pid {os.getpid()}, building since " in message and str(tiny.cache) in message, message
        assert message.count("mmfast: waiting") == 1
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=TIMEOUT)
        waiter = tiny.start(source)
        _wait_for(lambda: "waiting" in waiter.err.read_text(), "the second waiter's message")
    assert tiny.finish(waiter) == "A"
    assert tiny.compiles() == 1


@pytest.mark.parametrize("kill_point", ["while compiling", "after compiling, before the move"])
def test_a_build_killed_with_sigkill_never_blocks_the_next_one(tiny, kill_point):
    source = tiny.checkout("A")
    if kill_point == "while compiling":
        victim = tiny.start(source, compile_delay=600)
        _wait_for(lambda: tiny.compiles() == 1, "the compile to start")
    else:
        victim = tiny.start(source, "pause-before-publish")
        _wait_for(lambda: "not yet published" in victim.out.read_text(), "the compile to finish")
    victim.send_signal(signal.SIGKILL)  # the process only, as the OOM killer does: its compiler may live on
    victim.wait(timeout=TIMEOUT)
    assert tiny.temp_folders() and not tiny.build_folders()
    assert tiny.run(source) == "A"
    assert tiny.compiles() == 2
    assert len(tiny.build_folders()) == 1 and not tiny.temp_folders()  # the dead build's folder was cleaned
