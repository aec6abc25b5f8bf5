"""No unsafe loading (docs/design.md §13): a checkpoint whose pickle runs a shell command is refused everywhere.

The crafted file is what an attacker would ship: a torch.save archive whose ``__reduce__`` calls
``os.system`` to create a marker file, once as a plain file and once with a valid pmmrec SHA-256 trailer (the
checksum detects corruption, it is not a signature: only ``weights_only=True`` stops the code). Every loader
and every CLI command that takes a checkpoint must refuse it, and the marker must never appear. A static scan
keeps every ``torch.load`` of the code base on ``weights_only=True`` and every unpickling on the allow-list.
"""

import ast
import hashlib
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from pmmrec.cli import main
from pmmrec.errors import PmmrecError
from pmmrec.runtime.checkpoint import _TRAILER, load_checkpoint, load_resume_checkpoint

SRC = Path(__file__).resolve().parents[3] / "src" / "pmmrec"


class Shell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(params=["plain", "with_checksum"])
def evil(request, tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"format_version": 1, "model": {"w": Shell(f"touch {marker}")}, "trainer_state": {"update": 9},
                "config": {}, "item_ids": []}, buffer, pickle_module=pickle)
    data = buffer.getvalue()
    if request.param == "with_checksum":
        data += _TRAILER + hashlib.sha256(data).hexdigest().encode("ascii")
    path = tmp_path / "checkpoints" / "best.pt"
    path.parent.mkdir()
    path.write_bytes(data)
    return path, marker


def test_the_payload_works_when_unpickled(tmp_path):
    """The test's own premise: loading the file the unsafe way does run the command."""
    marker = tmp_path / "pwned"
    torch.save({"x": Shell(f"touch {marker}")}, tmp_path / "e.pt", pickle_module=pickle)
    torch.load(tmp_path / "e.pt", weights_only=False)
    assert marker.exists()


def test_load_checkpoint_and_resume_refuse_it(evil):
    path, marker = evil
    with pytest.raises(PmmrecError, match="not a loadable pmmrec checkpoint"):
        load_checkpoint(path)
    with pytest.raises(PmmrecError, match="no usable checkpoint"):
        load_resume_checkpoint([path])
    from pmmrec import Recommender  # what `pmmrec serve` loads through

    with pytest.raises(PmmrecError):
        Recommender.from_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["evaluate", "--checkpoint", "{ckpt}"],
    ["recommend", "--checkpoint", "{ckpt}", "--history", "i1 i2"],
    ["export-embeddings", "--checkpoint", "{ckpt}", "--out", "{tmp}/vectors"],
    ["transfer", "--from", "{ckpt}", "data.domain={tmp}", "run.dir={tmp}/run"],
    ["train", "-c", "{tiny}", "data.domain={world}/target", "run.dir={tmp}/run", "--resume"],
    ["import-checkpoint", "{ckpt}", "--text-encoder", "{tmp}", "--vision-encoder", "{tmp}", "--out", "{tmp}/o.pt"],
], ids=lambda c: c[0])
def test_every_command_refuses_it(evil, command, capsys, quick_world):
    path, marker = evil
    args = [a.format(ckpt=path, tmp=path.parent.parent, world=quick_world, tiny=SRC.parents[1] / "configs" /
                     "tiny.yaml") for a in command]
    if command[0] == "train":  # the run folder's own checkpoint, picked up by --resume
        run = path.parent.parent / "run" / "checkpoints"
        run.mkdir(parents=True)
        os.replace(path, run / "last.pt")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not a loadable pmmrec checkpoint" in err or "weights_only=True" in err, err
    assert not marker.exists()


def test_every_load_in_the_code_base_is_safe():
    """Every torch.load call passes weights_only=True; pickle is only used through reference.py's allow-list."""
    loads, unsafe = 0, []
    for file in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            name = ast.unparse(node.func) if isinstance(node, ast.Call) else None
            if name == "torch.load":
                loads += 1
                if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords):
                    unsafe.append(f"{file.name}:{node.lineno}: {ast.unparse(node)}")
            elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "numpy.load", "np.load") or (
                    isinstance(node, ast.ClassDef) and file.name != "reference.py"
                    and any(ast.unparse(b) == "pickle.Unpickler" for b in node.bases)):
                if name in ("numpy.load", "np.load") and any(
                        k.arg == "allow_pickle" and getattr(k.value, "value", None) is False for k in node.keywords):
                    continue
                if name in ("numpy.load", "np.load") and not any(k.arg == "allow_pickle" for k in node.keywords):
                    continue  # numpy's default is allow_pickle=False
                unsafe.append(f"{file.name}:{node.lineno}")
    assert loads >= 3 and not unsafe, unsafe
