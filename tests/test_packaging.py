"""The checkout's top-level folders never shadow another project's package, from any working directory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("cwd", [ROOT, Path("/")], ids=["repo-root", "elsewhere"])
def test_huggingface_kernels_and_models_import_beside_the_checkout(cwd):
    # `python -c` puts the working directory first on sys.path, as pytest's rootdir insertion and a notebook do.
    out = _run(
        "import kernels, transformers, peft\n"
        "from kernels import CUDAProperties\n"  # what transformers imports from Hugging Face's package
        "from transformers import LlamaForCausalLM\n"
        "import mmfast, mmfast.kernels.lora\n"
        "print(kernels.__file__)\n"
        "print(mmfast.kernels.lora.__file__)\n",
        cwd,
    )
    hf_kernels, mmfast_lora = out.split()
    assert Path(hf_kernels).parent.parent.name in ("site-packages", "dist-packages"), hf_kernels
    assert Path(mmfast_lora).parent.name == "kernels" and Path(mmfast_lora).name == "lora.py"


def test_the_source_folders_are_no_packages_of_their_own():
    # A folder with __init__.py at the root would be a regular package named `kernels` / `csrc`, which wins
    # over an installed package of that name whenever the root is on sys.path.
    for folder in ("kernels", "csrc"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py makes {folder}/ a top-level package"
