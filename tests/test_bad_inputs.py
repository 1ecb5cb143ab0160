"""Every row of README.md's "Bad input" table, run as typed: exit status 2 and exactly the one line shown.

Placeholders in the commands: {file} an existing regular file, {empty} an empty folder, {data} the shared
Omniglot folder (rows using it skip without MAML_SHARED_DATA), {run} a finished sinusoid run folder,
{yaml} a file holding the YAML after `<<<` in the command cell, {corrupt} a folder whose
images_background_small1.zip is not a zip file; {html} / {truncated} folders whose mini-ImageNet pickles are
an HTML page / cut in half, {nofine} a CIFAR-100 tarball without fine_labels, {cifar} a small valid one;
{locked} a copy of {run} whose run.lock names a live process of this host ({pid} on {host}), {remote} one
whose lock is from another host; {old} / {older} copies whose config.json lacks skip_nonfinite (which
declares the value older versions ran as) / hidden (which declares none).
"""

import importlib
import json
import os
import pickle
import re
import shlex
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from experiments import cli
from test_image_data import write_cifar_tarball

REPO = Path(__file__).resolve().parents[1]


def rows():
    text = (REPO / "README.md").read_text()
    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^\| `(python -m [^`]+)` \| `([^`]+)` \|$", section, re.M)
    assert len(found) >= 20, "the README's bad-input table should list at least 20 cases"
    return found


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory) -> dict[str, Path]:
    """{html}, {truncated}, {nofine}, {cifar}: dataset folders with one fault each (or none)."""
    root = tmp_path_factory.mktemp("image_folders")
    folders = {name: root / name for name in ("html", "truncated", "nofine", "cifar")}
    for folder in folders.values():
        folder.mkdir()
    whole = pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"n01": [0, 1]}})
    for split in ("train", "val", "test"):
        name = f"mini-imagenet-cache-{split}.pkl"
        (folders["html"] / name).write_bytes(b"<!DOCTYPE html><html><body>Google Drive</body></html>")
        (folders["truncated"] / name).write_bytes(whole[: len(whole) // 2])
    write_cifar_tarball(folders["nofine"] / "cifar-100-python.tar.gz", drop_key="fine_labels")
    write_cifar_tarball(folders["cifar"] / "cifar-100-python.tar.gz", train_per_class=1, test_per_class=1)
    return folders


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sinusoid"
    from experiments import sinusoid

    # only fields that may differ between a run and its resumption are changed from the defaults
    sinusoid.main(["--iterations", "20", "--baseline-iterations", "10", "--eval-tasks", "4", "--eval-points", "4", "--eval-steps", "0,1",
                   "--no-progress", "--wandb", "disabled", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def run_copies(finished_run, tmp_path_factory) -> dict[str, Path]:
    """{locked}, {remote}, {old}, {older}: copies of the finished run with a lock, or an older config.json."""
    root = tmp_path_factory.mktemp("run_copies")
    copies = {name: root / name for name in ("locked", "remote", "old", "older")}
    for path in copies.values():
        shutil.copytree(finished_run, path)
    lock = lambda pid, host: json.dumps({"pid": pid, "host": host, "started": "2026-01-01T00:00:00"})
    (copies["locked"] / "run.lock").write_text(lock(os.getppid(), socket.gethostname()))  # alive: our parent
    (copies["remote"] / "run.lock").write_text(lock(4242, "elsewhere"))
    for name, field in (("old", "skip_nonfinite"), ("older", "hidden")):
        saved = json.loads((copies[name] / "config.json").read_text())
        del saved[field]
        (copies[name] / "config.json").write_text(json.dumps(saved))
    return copies


@pytest.mark.parametrize("command, message", rows(), ids=lambda v: v[:60])
def test_bad_input_gives_its_one_line(command, message, tmp_path, capsys, request, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a row that wrongly got as far as writing its default --out writes here
    yaml = None
    if "<<<" in command:
        command, yaml = (part.strip() for part in command.split("<<<", 1))
    values = {"file": tmp_path / "a_file.txt", "empty": tmp_path / "empty", "yaml": tmp_path / "sweep.yaml"}
    values["file"].write_text("x")
    values["empty"].mkdir()
    values["corrupt"] = tmp_path / "corrupt"
    values["corrupt"].mkdir()
    (values["corrupt"] / "images_background_small1.zip").write_bytes(b"not a zip file at all")
    if yaml is not None:
        values["yaml"].write_text(yaml.replace("\\n", "\n"))
    if "{data}" in command + message:
        shared = os.environ.get("MAML_SHARED_DATA")
        if not shared or not Path(shared).is_dir():
            pytest.skip("real data not available: set MAML_SHARED_DATA to ../shared/data")
        values["data"] = Path(shared) / "omniglot"
    if any(f"{{{name}}}" in command for name in ("html", "truncated", "nofine", "cifar")):
        values.update(request.getfixturevalue("image_folders"))
    if "{run}" in command + message:
        values["run"] = request.getfixturevalue("finished_run")
    names = [name for name in ("locked", "remote", "old", "older") if f"{{{name}}}" in command]
    copies = {name: request.getfixturevalue("run_copies")[name] for name in names}
    values.update(copies, pid=os.getppid(), host=socket.gethostname())
    before = {p: p.read_bytes() for folder in copies.values() for p in sorted(folder.iterdir()) if p.is_file()}
    fill = lambda s: s.format(**{k: str(v) for k, v in values.items()})
    argv = shlex.split(fill(command))
    assert argv[:2] == ["python", "-m"]
    module = importlib.import_module(argv[2])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(module.main, argv[3:])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == fill(message), err
    assert not (tmp_path / "runs").exists(), f"{command!r} wrote its output folder before failing"
    after = {p: p.read_bytes() for folder in copies.values() for p in sorted(folder.iterdir()) if p.is_file()}
    assert after == before, f"{command!r} touched the run folder it refused"
