"""Backend choice: argument > use_backend > $MMFAST_BACKEND > device; named-but-unavailable raises why."""

import warnings

import pytest
import torch

import mmfast
from mmfast import _build, backends, reference

CPU = torch.device("cpu")


def test_automatic_choice_on_cpu_is_the_cpp_kernel(monkeypatch):
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    assert backends.select("cross_entropy", CPU) == "cpu"


def test_precedence_of_argument_context_and_environment(monkeypatch):
    monkeypatch.setenv("MMFAST_BACKEND", "torch")
    assert backends.select("cross_entropy", CPU, backends.requested_backend(None)) == "torch"
    with mmfast.use_backend("cpu"):
        assert backends.select("cross_entropy", CPU, backends.requested_backend(None)) == "cpu"
        assert backends.select("cross_entropy", CPU, backends.requested_backend("torch")) == "torch"
    assert backends.requested_backend(None) == ""


def test_the_chosen_backend_is_the_one_that_runs(monkeypatch):
    calls = []
    original = reference.cross_entropy_forward
    monkeypatch.setattr(reference, "cross_entropy_forward", lambda *a: calls.append(1) or original(*a))
    logits, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    mmfast.ops.cross_entropy(logits, target, backend="cpu")
    assert calls == []
    with mmfast.use_backend("torch"):
        mmfast.ops.cross_entropy(logits, target)
    assert calls == [1]


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend: expected one of triton, cuda, cpu, torch, got 'gpu'"):
        with mmfast.use_backend("gpu"):
            pass


def test_named_backend_that_cannot_run_says_why(monkeypatch):
    with pytest.raises(mmfast.BackendUnavailable, match="'cuda' cannot run cross_entropy on cpu tensors: .*CUDA tensors"):
        mmfast.ops.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(mmfast.BackendUnavailable, match="TRITON_INTERPRET=1"):
        backends.select("cross_entropy", CPU, "triton")
    monkeypatch.setenv("MMFAST_BACKEND", "cuda")
    with pytest.raises(mmfast.BackendUnavailable, match="'cuda' cannot run"):
        mmfast.ops.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_table_covers_every_op_and_backend():
    rows = backends.table()
    assert {(r["op"], r["backend"]) for r in rows} == {(o, b) for o in backends.OPS for b in backends.BACKENDS}
    torch_row = next(r for r in rows if r["backend"] == "torch")
    assert torch_row["cpu"] == "yes"


@pytest.fixture
def broken_extension(tmp_path, monkeypatch):
    """A real compiler failure: csrc replaced by a source that does not compile, in a fresh cache."""
    (tmp_path / "src" / "cpu").mkdir(parents=True)
    (tmp_path / "src" / "ops.cpp").write_text("this is not C++;\n")
    monkeypatch.setattr(_build, "csrc_dir", lambda: tmp_path / "src")
    monkeypatch.setenv("MMFAST_CACHE", str(tmp_path / "cache"))
    for name, value in (("_module", None), ("_error", None), ("_attempted", False)):
        monkeypatch.setattr(_build, name, value)


def test_failed_build_warns_once_and_falls_back_to_torch(broken_extension, monkeypatch):
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert backends.select("cross_entropy", CPU) == "torch"
    assert "ops.cpp:1" in _build.error() and "error" in _build.error()  # the compiler's own words
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough: no second warning, no second build
        assert backends.select("cross_entropy", CPU) == "torch"
    with pytest.raises(mmfast.BackendUnavailable, match=r"the C\+\+ extension failed to build: .*ops.cpp:1:1: error"):
        backends.select("cross_entropy", CPU, "cpu")
    logits, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    torch.testing.assert_close(mmfast.ops.cross_entropy(logits, target), torch.nn.functional.cross_entropy(logits, target))


def test_table_never_compiles_and_says_how_to_build(broken_extension, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a build attempt would warn (the source does not compile)
        rows = backends.table()
    cpu_rows = [r for r in rows if r["backend"] == "cpu"]
    assert len(cpu_rows) == len(backends.OPS)
    assert all(r["cpu"] == "not built yet: `mmfast build` (or first use) compiles it" for r in cpu_rows), cpu_rows
    assert not (tmp_path / "cache").exists()


def test_table_names_a_missing_compiler(broken_extension, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    cpu_row = next(r for r in backends.table() if r["backend"] == "cpu")
    assert cpu_row["cpu"] == "no C++ compiler: 'no-such-compiler++' not found (install one or set CXX)"
