"""The leakage audit: its scoring against a hand computation, its refusals, and a run
end to end on a tiny federation."""
import json
import math
import subprocess
import sys

import pytest
import torch

from omnifm.audit import _scores, leakage, table
from omnifm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--rounds", "1", "--clients", "3", "--participation", "1.0", "--samples-per-client", "12",
        "--image-size", "16", "--width", "0.125"]


def test_scores_by_hand():
    images = torch.full((2, 3, 16, 16), 0.5)
    psnr, ssim = _scores(torch.zeros(3, 3, 16, 16), images)
    assert psnr.shape == ssim.shape == (3, 2)
    assert torch.allclose(psnr, torch.full((3, 2), 10 * math.log10(1 / 0.25)))  # MSE 0.25
    _, same = _scores(images[:1], images)
    assert torch.allclose(same, torch.ones(1, 2))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    res = subprocess.run([sys.executable, "-m", "omnifm.cli", "train", "--strategy", "omnifm,fedavg", *TINY,
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_audit_end_to_end(run, capsys):
    result = leakage(str(run), public=48, steps=20)
    for target in ("prototypes", "single tokens"):
        for guess in ("recon", "mean_image"):
            assert all(math.isfinite(v) for v in result[target][guess].values()), (target, guess)
    assert result["dp"] == {"clip": 0.0, "noise": 0.0}
    text = table(result, "t")
    assert "| prototypes | inversion network |" in text and "| single tokens | mean public image (baseline) |" in text
    main(["audit", "leakage", "--run", str(run), "--public", "48", "--steps", "20"])
    assert (run / "leakage.md").read_text().strip() == capsys.readouterr().out.strip()


def test_audit_refuses_what_it_cannot_audit(run, tmp_path, capsys):
    other = tmp_path / "fedavg_only"
    other.mkdir()
    saved = json.loads((run / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**saved, "strategies": ["fedavg"]}))
    with pytest.raises(ValueError, match="has no omnifm run"):
        leakage(str(other))
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "leakage", "--run", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and "no config.json there" in capsys.readouterr().err
