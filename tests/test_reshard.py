"""``python -m llama.reshard`` rewrites a checkpoint into any number of shards in Meta's layout."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.reshard import reshard

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def shard_files(ckpt_dir) -> list:
    return sorted(Path(ckpt_dir).glob("consolidated.*.pth"))


@pytest.fixture(scope="module")
def one_shard(make_checkpoint):
    return make_checkpoint(n_shards=1)


def test_split_then_merge_gives_the_original_tensors_bit_for_bit(one_shard, tmp_path):
    ckpt_dir, _ = one_shard
    reshard(ckpt_dir, str(tmp_path / "four"), 4)
    reshard(str(tmp_path / "four"), str(tmp_path / "one"), 1)
    original, merged = load(Path(ckpt_dir) / "consolidated.00.pth"), load(tmp_path / "one" / "consolidated.00.pth")
    assert merged.keys() == original.keys()
    for key in original:
        assert merged[key].dtype == original[key].dtype, key
        assert torch.equal(merged[key], original[key]), key


def test_split_shards_are_metas_layout(one_shard, make_checkpoint, tmp_path):
    # the reference: the same weights written directly as 4 shards by save_checkpoint (torch.chunk)
    ckpt_dir, _ = one_shard
    reference_dir, _ = make_checkpoint(n_shards=4)
    reshard(ckpt_dir, str(tmp_path / "four"), 4)
    assert [p.name for p in shard_files(tmp_path / "four")] == [f"consolidated.0{i}.pth" for i in range(4)]
    for ours_path, reference_path in zip(shard_files(tmp_path / "four"), shard_files(reference_dir)):
        ours, reference = load(ours_path), load(reference_path)
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[key], reference[key]) for key in reference)


def test_two_shards_resharded_to_four_equal_four_written_directly(make_checkpoint, tmp_path):
    two_dir, _ = make_checkpoint(n_shards=2)
    four_dir, _ = make_checkpoint(n_shards=4)
    reshard(two_dir, str(tmp_path / "four"), 4)
    for ours_path, reference_path in zip(shard_files(tmp_path / "four"), shard_files(four_dir), strict=True):
        ours, reference = load(ours_path), load(reference_path)
        assert all(torch.equal(ours[key], reference[key]) for key in reference)


def test_each_saved_tensor_holds_only_its_own_bytes(one_shard, tmp_path):
    ckpt_dir, _ = one_shard
    reshard(ckpt_dir, str(tmp_path / "four"), 4)
    for path in shard_files(tmp_path / "four"):
        for key, tensor in load(path).items():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), (path.name, key)


def test_params_json_is_copied_unchanged(one_shard, tmp_path):
    ckpt_dir, _ = one_shard
    reshard(ckpt_dir, str(tmp_path / "two"), 2)
    assert (tmp_path / "two" / "params.json").read_bytes() == (Path(ckpt_dir) / "params.json").read_bytes()


def test_non_empty_output_directory_is_refused(one_shard, tmp_path):
    ckpt_dir, _ = one_shard
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="output .*out already exists and is not an empty directory"):
        reshard(ckpt_dir, str(tmp_path / "out"), 2)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_empty_output_directory_is_used(one_shard, tmp_path):
    ckpt_dir, _ = one_shard
    (tmp_path / "out").mkdir()
    reshard(ckpt_dir, str(tmp_path / "out"), 2)
    assert len(shard_files(tmp_path / "out")) == 2


@pytest.mark.parametrize("n_shards", [0, -2, 2.0, True])
def test_shard_count_must_be_a_positive_integer(one_shard, tmp_path, n_shards):
    ckpt_dir, _ = one_shard
    with pytest.raises(ValueError, match=f"the number of shards must be a positive integer, got {n_shards!r}"):
        reshard(ckpt_dir, str(tmp_path / "out"), n_shards)


def test_shard_count_that_does_not_divide_the_heads_says_what_would(one_shard, tmp_path):
    ckpt_dir, _ = one_shard
    with pytest.raises(ValueError, match=r"over 3 model-parallel ranks or shards: .* would work: 1, 2, 4$"):
        reshard(ckpt_dir, str(tmp_path / "out"), 3)
    assert not (tmp_path / "out").exists()


def test_corrupt_source_shard_is_named(make_checkpoint, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(make_checkpoint(n_shards=2)[0], source)
    (source / "consolidated.01.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint shard .*consolidated.01.pth"):
        reshard(str(source), str(tmp_path / "out"), 1)
    assert not (tmp_path / "out").exists()


def test_command_line_reshards_and_reports_errors_without_a_traceback(one_shard, tmp_path):
    ckpt_dir, _ = one_shard
    command = [
        sys.executable,
        "-m",
        "llama.reshard",
        "--ckpt_dir",
        ckpt_dir,
        "--out",
        str(tmp_path / "two"),
        "--shards",
        "2",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(shard_files(tmp_path / "two")) == 2
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert again.stderr == f"error: output {tmp_path / 'two'} already exists and is not an empty directory\n"


def test_the_tokenizer_in_or_beside_the_folder_is_copied(one_shard, tokenizer_path, tmp_path):
    ckpt_dir, _ = one_shard
    meta_download = tmp_path / "download"  # Meta's layout: tokenizer.model beside llama-2-7b/
    shutil.copytree(ckpt_dir, meta_download / "llama-2-7b")
    shutil.copyfile(tokenizer_path, meta_download / "tokenizer.model")
    reshard(str(meta_download / "llama-2-7b"), str(tmp_path / "two"), 2)
    reshard(str(tmp_path / "two"), str(tmp_path / "one"), 1)  # now inside the folder
    for out in ("two", "one"):
        assert (tmp_path / out / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()


def test_without_a_tokenizer_the_output_has_none_and_a_warning_says_so(one_shard, tmp_path, caplog):
    ckpt_dir, _ = one_shard
    reshard(ckpt_dir, str(tmp_path / "two"), 2)
    assert not (tmp_path / "two" / "tokenizer.model").exists()
    assert "the output will have no tokenizer.model" in caplog.text


def test_a_hugging_face_folder_is_pointed_to_convert(tmp_path):
    folder = tmp_path / "Llama-2-7b-hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')  # what marks the layout
    command = f"python -m llama.convert --ckpt_dir {folder} --out {tmp_path / 'out'} --format meta --shards 2"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"is a Hugging Face folder (config.json); reshard rewrites Meta's layout. Convert it instead: {command}"
        ),
    ):
        reshard(str(folder), str(tmp_path / "out"), 2)
