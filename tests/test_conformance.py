"""The project reproduces the paper's released code on ../shared/conformance."""
from pathlib import Path

import pytest
import torch

from guided.cli import conformance as conformance_cli
from guided.evaluation import conformance
from guided.errors import GuidedError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance"
FILES = sorted(SHARED.glob("*.pt"))


def test_shared_files_present():
    assert FILES, f"no conformance files under {SHARED}"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_file_within_tolerance(path):
    rows = conformance.check_file(path)
    assert rows, "a file must yield at least one checked quantity"
    bad = [(r.quantity, r.error) for r in rows if not r.ok]
    assert not bad, f"{path.name}: {bad}"


def test_cli_passes_on_shared_schedules(capsys):
    files = [str(p) for p in FILES if p.name.startswith("schedule")]
    assert conformance_cli.main(files) == 0
    assert "within tolerance" in capsys.readouterr().out


def test_cli_fails_on_tampered_output(tmp_path, capsys):
    d = torch.load(SHARED / "schedule_cosine_250.pt", weights_only=True)
    d["betas"] = d["betas"] * 1.001
    torch.save(d, tmp_path / "bad.pt")
    assert conformance_cli.main([str(tmp_path / "bad.pt")]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"kind": "vae"}, "unknown kind"),
    ({"use_kl_typo": True}, "unknown entry"),
    ({"timestep_respacing": "2000"}, "asks for 2000 steps"),
])
def test_cli_refuses_what_it_cannot_honour(tmp_path, capsys, change, message):
    d = torch.load(SHARED / "schedule_linear_ddim25.pt", weights_only=True)
    d.update(change)
    torch.save(d, tmp_path / "x.pt")
    assert conformance_cli.main([str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_flag_in_network_file_is_named(tmp_path):
    d = torch.load(SHARED / "unet_a.pt", weights_only=True)
    d["flags"] = {**d["flags"], "use_magic": True}
    torch.save(d, tmp_path / "u.pt")
    with pytest.raises(GuidedError, match="use_magic"):
        conformance.check_file(tmp_path / "u.pt")


def test_unreadable_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(GuidedError, match="not a readable conformance file"):
        conformance.check_file(tmp_path / "junk.pt")
