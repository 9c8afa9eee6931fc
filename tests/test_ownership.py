"""ownership: what vggjax wrote is proven by its recorded digests; only that is deleted or replaced,
and folders recorded under the earlier name (`.vggjax-manifest.json`) stay vggjax's."""
import json

import pytest

from helpers import write_dir
from vggjax.utils import atomic, ownership


def test_remove_owned_deletes_exactly_what_vggjax_wrote_or_nothing(tmp_path):
    work = tmp_path / "work"
    write_dir(work / "export" / "frozen")
    with atomic.writing(work / "run.json") as tmp:
        tmp.write_text("{}")
    (work / "checkpoints" / "frozen" / "1").mkdir(parents=True)
    (work / "checkpoints" / "frozen" / "1" / "state").write_bytes(b"orbax")
    ownership.record(work / "checkpoints" / "frozen", unverified=[r"\d+\.orbax-checkpoint-tmp"])
    (work / "checkpoints" / "frozen" / "2.orbax-checkpoint-tmp-7").mkdir()  # an interrupted save
    (work / "checkpoints" / "mymodel.pt").write_bytes(b"the user's")
    targets = [work / "run.json", work / "export", work / "checkpoints", work / "absent"]
    with pytest.raises(atomic.RefusedError, match=r"checkpoints holds files vggjax did not write "
                                                   r"\(checkpoints/mymodel.pt\); refusing to delete it"):
        ownership.remove_owned(targets)
    assert (work / "run.json").is_file() and (work / "export" / "frozen" / "data.bin").is_file()
    (work / "checkpoints" / "mymodel.pt").unlink()
    ownership.remove_owned(targets)
    assert list(work.iterdir()) == []


def test_a_folder_recorded_under_the_earlier_name_stays_vggjaxs_and_moves_to_the_new_one(tmp_path):
    write_dir(tmp_path / "old")
    (tmp_path / ownership.OWNED).rename(tmp_path / ownership.LEGACY_OWNED)  # as an earlier vggjax left it
    (tmp_path / "notes.txt").write_text("the user's")
    assert ownership.foreign(tmp_path / "old") == [] and ownership.foreign(tmp_path / "notes.txt") == [""]
    write_dir(tmp_path / "old", overwrite=True)  # replaced: proven vggjax's by the earlier record
    write_dir(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, "new", "notes.txt", "old"]
    assert sorted(json.loads((tmp_path / ownership.OWNED).read_text())) == ["new", "old"]
    with pytest.raises(atomic.RefusedError, match="notes.txt"):
        ownership.remove_owned([tmp_path / "old", tmp_path / "notes.txt"])
    ownership.remove_owned([tmp_path / "old", tmp_path / "new"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
