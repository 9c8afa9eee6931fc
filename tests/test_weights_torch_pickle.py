"""vggjax.weights.torch_pickle: torch.save files read without torch and without running their pickles."""
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from vggjax.weights.torch_pickle import read_state_dict


def test_torch_pickle_reads_both_formats_and_runs_no_code(tmp_path):
    state = {"w": torch.randn(3, 4).t(), "b": torch.arange(5), "h": torch.randn(2).half()}
    for zip_format in (True, False):
        path = tmp_path / f"state_{zip_format}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        got = read_state_dict(path)
        for k, v in state.items():  # w is a transposed (strided) view
            np.testing.assert_array_equal(got[k], v.numpy())
            assert got[k].dtype == v.numpy().dtype

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    for zip_format in (True, False):
        bad = tmp_path / f"bad_{zip_format}.pth"
        torch.save({"lin0.model.1.weight": Exploit()}, bad, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(ValueError, match=r"refused for safety: .*system"):
            read_state_dict(bad)
    assert not (tmp_path / "pwned").exists()
    good = tmp_path / "state_False.pth"
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:-6])
    with pytest.raises(ValueError, match="cut.pth.*truncated"):
        read_state_dict(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("not a torch file")
    with pytest.raises(ValueError, match="text.pth"):
        read_state_dict(tmp_path / "text.pth")


class _CraftedTensor:
    """Pickles as torch's own tensor rebuild call, with a layout torch itself would never write."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


@pytest.mark.parametrize("offset, size, stride", [(-64, (4,), (1,)), (0, (4,), (-8,)), (0, (2, 2), (1,)),
                                                  (10**6, (1,), (1,))])
def test_a_crafted_layout_cannot_read_outside_its_storage(tmp_path, offset, size, stride):
    storage = torch.arange(8, dtype=torch.float32).storage()
    for zip_format in (True, False):
        path = tmp_path / f"crafted_{zip_format}.pth"
        torch.save({"w": _CraftedTensor(storage, offset, size, stride)}, path,
                   _use_new_zipfile_serialization=zip_format)
        with pytest.raises(ValueError, match=f"crafted_{zip_format}.pth.*'w'"):
            read_state_dict(path)
