"""pytest plugin for the peer-suite runs (tests/peer/run.py): one JSON line per test with its outcome, written
to the file named by $MMFAST_PEER_RECORD, so a plain and a patched run can be compared test by test.

Tests that need the Hugging Face Hub: the runs have no network (HF_HUB_OFFLINE=1), so a test that fails with
huggingface_hub's offline or missing-local-file error anywhere in its exception chain is reported as skipped,
"needs the Hugging Face Hub", and counted apart ("hub"), in both runs alike.

Patching plugins (peer_patch_*.py) add ("mmfast_fused_calls", n) and ("mmfast_fallbacks", n) to the call
report's user_properties; they are recorded with the outcome.
"""

from __future__ import annotations

import json
import os

import pytest

HUB_REASON = "needs the Hugging Face Hub (offline run)"


def _needs_hub(exception: BaseException | None) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while exception is not None and id(exception) not in seen:
        seen.add(id(exception))
        if isinstance(exception, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            return True
        exception = exception.__cause__ or exception.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _needs_hub(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {HUB_REASON}")
        report.mmfast_hub = True


class _Recorder:
    def __init__(self, path: str):
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (open for the whole session)
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        entry = self.tests.setdefault(report.nodeid, {"outcome": "passed", "fused_calls": 0, "fallbacks": 0,
                                                      "seconds": 0.0})
        entry["seconds"] = round(entry["seconds"] + report.duration, 3)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            entry["outcome"] = ("hub" if getattr(report, "mmfast_hub", False) else
                                "failed" if report.failed and report.when == "call" else
                                "error" if report.failed else report.outcome)
        elif report.when == "teardown" and report.failed and entry["outcome"] == "passed":
            entry["outcome"] = "error"
        for key, value in report.user_properties:
            if key == "mmfast_fused_calls":
                entry["fused_calls"] += value
            elif key == "mmfast_fallbacks":
                entry["fallbacks"] += value
        if report.when == "teardown":
            self.file.write(json.dumps({"test": report.nodeid, **self.tests.pop(report.nodeid)}) + "\n")
            self.file.flush()

    def pytest_deselected(self, items):
        self.file.write(json.dumps({"deselected": len(items)}) + "\n")

    def pytest_collectreport(self, report):
        if report.failed:
            self.file.write(json.dumps({"test": report.nodeid, "outcome": "collection error",
                                        "fused_calls": 0, "fallbacks": 0}) + "\n")

    def pytest_sessionfinish(self):
        self.file.close()


def pytest_configure(config):
    path = os.environ.get("MMFAST_PEER_RECORD")
    if not path:
        raise pytest.UsageError("peer_record: set MMFAST_PEER_RECORD to the file the outcomes go to")
    config.pluginmanager.register(_Recorder(path), "mmfast_peer_recorder")
