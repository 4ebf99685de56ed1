"""``atlas label --device``: the search of a labelling run on a torch device (`indexes.torch_search`),
here torch on the CPU: the same rows as the numpy path up to ties, and a run resumed the same way."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from engine.cli import cli
from engine.labelling import run as labelling
from indexes import torch_search
from tests.labelling.test_labelling import mapped, rows_of  # noqa: F401  (a fixture)


def _label(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_label_on_a_torch_device_gives_the_numpy_rows_and_resumes(mapped):  # noqa: F811
    store, _atlas, _amap, _feats, path = mapped
    st = ["--store", store.path]
    try:
        _label("label", "m", "--features", path, "-k", 3, "--batch", 64, "--name", "np", "--json", *st)
        out = _label("label", "m", "--features", path, "-k", 3, "--batch", 64, "--name", "tc", "--device", "cpu",
                     "--json", *st)
        assert (out["status"], out["n_done"]) == ("done", 230)
        assert torch_search.search_device() == "cpu"
        a, b = np.array(rows_of(store, "np")), np.array(rows_of(store, "tc"))
        np.testing.assert_allclose(b[:, 3], a[:, 3], atol=1e-5)  # the same scores rank by rank
        clear = np.r_[np.abs(np.diff(a[:, 3])) > 1e-5, True]  # rows whose score ties with no neighbour
        assert (a[clear, 2] == b[clear, 2]).all()
        # a run recorded but not carried out is continued with --resume on the device
        labelling.prepare_run(store, labelling.LabelRequest("m", str(path), k=3, batch_size=64, name="later"))
        out = _label("label", "--resume", "later", "--device", "cpu", "--json", *st)
        assert out["n_done"] == 230 and rows_of(store, "later") == rows_of(store, "tc")
    finally:
        torch_search.set_search_device(None)
        torch_search._RESIDENT.clear()
    if not torch.cuda.is_available():
        r = CliRunner().invoke(cli, ["label", "m", "--features", str(path), "--device", "cuda", *map(str, st)])
        assert r.exit_code == 2 and "no CUDA device" in r.output and "Traceback" not in r.output
