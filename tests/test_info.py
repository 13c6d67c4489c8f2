import json
import os
import subprocess
import sys

import pytest

import omnifm_ext
from omnifm.ops import backend_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_is_built():
    """CI builds the extension: a silent fallback to the reference must not pass."""
    if os.environ.get("OMNIFM_ALLOW_NO_EXT") == "1":
        pytest.skip("OMNIFM_ALLOW_NO_EXT=1")
    assert omnifm_ext.AVAILABLE, omnifm_ext.LOAD_ERROR
    info = omnifm_ext.build_info()
    assert {"lowpass_spectrum", "spectral_token", "cosine_topk", "eca_core"} <= set(info["cpu_ops"])


def test_backend_info_reports_every_op_and_device():
    info = backend_info()
    assert set(info["ops"]) == {"lowpass_spectrum", "spectral_token", "cosine_topk", "eca_attention"}
    for op in info["ops"]:
        for dev in ("cpu", "cuda"):
            choice = info["ops"][op][dev]
            others = {"reference", "ext", "triton"} - {choice["backend"]}
            assert others <= set(choice["skipped"]), (op, dev, choice)
            assert all(isinstance(why, str) and why for why in choice["skipped"].values())
    if omnifm_ext.AVAILABLE:
        # eca_attention's CPU default is its rank-k PyTorch core (see its CPU_EXT_SKIPPED).
        assert all(info["ops"][op]["cpu"]["backend"] == "ext" for op in info["ops"] if op != "eca_attention")
        assert info["ops"]["eca_attention"]["cpu"]["backend"] == "reference"


def test_backend_info_says_how_eca_residual_runs():
    note = backend_info()["notes"]["eca_attention"]
    assert note.startswith("eca_residual") and "eca_psp" in note
    assert ("one compiled call" in note) == omnifm_ext.AVAILABLE


def test_backend_info_says_whether_cosine_topk_screens(monkeypatch):
    topk = sys.modules["omnifm.ops.cosine_topk"]
    monkeypatch.setattr(topk, "cpu_has_fast_bfloat16", lambda: False)
    assert "off" in backend_info()["notes"]["cosine_topk"]
    if omnifm_ext.AVAILABLE:
        monkeypatch.setattr(topk, "cpu_has_fast_bfloat16", lambda: True)
        assert f"{topk.SCREEN_MIN_ROWS[False]} rows" in backend_info()["notes"]["cosine_topk"]


def run(code_or_args, env_extra=None, module=False):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "-m", "omnifm.cli", *code_or_args] if module else [sys.executable, "-c", code_or_args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_info_text_and_json():
    res = run(["info"], module=True)
    assert res.returncode == 0, res.stderr
    assert "spectral_token" in res.stdout and "cpu" in res.stdout
    res = run(["info", "--json"], module=True)
    assert json.loads(res.stdout)["ops"]["lowpass_spectrum"]["cpu"]["backend"] in ("ext", "reference")


def test_import_without_extension_falls_back_to_reference():
    code = (
        "import sys; sys.modules['omnifm_ext._C'] = None\n"  # makes `from . import _C` fail
        "import torch, omnifm, omnifm_ext\n"
        "from omnifm.ops import backend_info, lowpass_spectrum, lowpass_spectrum_ref\n"
        "assert not omnifm_ext.AVAILABLE\n"
        "info = backend_info()['ops']['spectral_token']['cpu']\n"
        "assert info['backend'] == 'reference', info\n"
        "assert 'not loaded' in info['skipped']['ext'], info\n"
        "x = torch.rand(2, 1, 8, 8)\n"
        "assert torch.equal(lowpass_spectrum(x, 4), lowpass_spectrum_ref(x, 4))\n"
        "import os; os.environ['OMNIFM_BACKEND'] = 'ext'\n"
        "try:\n    lowpass_spectrum(x, 4)\nexcept RuntimeError as e:\n    print('raised:', e)\n"
    )
    res = run(code, {"OMNIFM_BACKEND": ""})
    assert res.returncode == 0, res.stderr
    assert "raised: OMNIFM_BACKEND=ext cannot run this call: omnifm_ext not loaded" in res.stdout
