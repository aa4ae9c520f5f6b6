import io
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pixelrepa_diffusers.data import (
    center_crop_arr,
    collate_train_batch,
    load_train_dataset,
    make_quickstart_dataset,
    prepared_shard_names,
)
from training import prepare_dataset

REPO = Path(__file__).resolve().parents[1]
PREPARE_SCRIPT = REPO / "training" / "prepare_dataset.py"


def random_image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "size, image_size, steps",
    [
        # 403 >= 2 * 128: box-halve to 300 x 201; 201 * 128 / 201 = 128 and 300 * 128 / 201 = 191.04 -> 191; crop x 31.
        ((600, 403), 128, [("box", (300, 201)), ("bicubic", (191, 128)), ("crop", (31, 0))]),
        # Upscale: 32 / 37 makes 50 -> 43.24 -> 43; crop y (43 - 32) // 2 = 5.
        ((37, 50), 32, [("bicubic", (32, 43)), ("crop", (0, 5))]),
        # 515 >= 512: halve once to 515 x 257; 515 * 256 / 257 = 512.996 -> 513; crop x 128.
        ((1030, 515), 256, [("box", (515, 257)), ("bicubic", (513, 256)), ("crop", (128, 0))]),
        # Python's round: 14 * 0.75 = 10.5 rounds to 10 (half to even), so the crop starts at x 0.
        ((14, 12), 9, [("bicubic", (10, 9)), ("crop", (0, 0))]),
        # Already the right size: the image is unchanged.
        ((16, 16), 16, [("crop", (0, 0))]),
    ],
)
def test_center_crop_follows_adm(size, image_size, steps):
    image = random_image(*size, seed=sum(size))
    expected = image
    for step, value in steps:
        if step == "box":
            expected = expected.resize(value, resample=Image.BOX)
        elif step == "bicubic":
            expected = expected.resize(value, resample=Image.BICUBIC)
        else:
            expected = expected.crop((value[0], value[1], value[0] + image_size, value[1] + image_size))
    cropped = center_crop_arr(image, image_size)
    assert cropped.size == (image_size, image_size)
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(expected))


@pytest.fixture
def image_folder(tmp_path):
    """Classes "cat" (2 images, one nested) and "ant" (2 images, one corrupt), plus a text file and a loose image."""
    root = tmp_path / "images"
    (root / "cat" / "nested").mkdir(parents=True)
    (root / "ant").mkdir()
    random_image(40, 30, seed=1).save(root / "cat" / "a.png")
    random_image(20, 50, seed=2).save(root / "cat" / "nested" / "b.JPEG", quality=95)
    random_image(33, 33, seed=3).save(root / "ant" / "c.bmp")
    (root / "ant" / "d.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "ant" / "notes.txt").write_text("not an image")
    random_image(8, 8, seed=4).save(root / "loose.png")
    return root


def test_image_folder_items_labels_and_skipped(image_folder, caplog):
    dataset = load_train_dataset(train_data_dir=str(image_folder), resolution=16, random_flip=False)
    assert dataset.class_names == ["ant", "cat"] and len(dataset) == 4
    with caplog.at_level(logging.WARNING, logger="pixelrepa_diffusers.data"):
        items = [dataset[i] for i in range(len(dataset))]
    assert items[1] is None and "d.jpg" in caplog.text
    expected_files = [image_folder / name for name in ("ant/c.bmp", "cat/a.png", "cat/nested/b.JPEG")]
    for item, path, label in zip([items[0], items[2], items[3]], expected_files, [0, 1, 1]):
        assert item["pixel_values"].dtype == torch.uint8 and item["pixel_values"].shape == (3, 16, 16)
        expected = np.asarray(center_crop_arr(Image.open(path).convert("RGB"), 16)).transpose(2, 0, 1)
        np.testing.assert_array_equal(item["pixel_values"].numpy(), expected)
        assert item["class_labels"].dtype == torch.int64 and item["class_labels"].item() == label
    batch = collate_train_batch(items)
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["num_skipped"] == 1
    assert batch["class_labels"].tolist() == [0, 1, 1]
    empty = collate_train_batch([None, None])
    assert empty["pixel_values"].shape[0] == 0 and empty["class_labels"].shape == (0,) and empty["num_skipped"] == 2


def test_flip_is_seeded_by_seed_epoch_and_index(tmp_path):
    root = tmp_path / "images"
    (root / "only").mkdir(parents=True)
    for i in range(16):
        random_image(12, 12, seed=i).save(root / "only" / f"{i:02d}.png")
    plain = load_train_dataset(train_data_dir=str(root), resolution=12, random_flip=False)
    flipping = load_train_dataset(train_data_dir=str(root), resolution=12, seed=3)

    def flips(dataset):
        result = []
        for i in range(len(dataset)):
            image, reference = dataset[i]["pixel_values"], plain[i]["pixel_values"]
            assert torch.equal(image, reference) or torch.equal(image, reference.flip(2))
            result.append(not torch.equal(image, reference))
        return result

    epoch0 = flips(flipping)
    assert 0 < sum(epoch0) < 16
    assert flips(load_train_dataset(train_data_dir=str(root), resolution=12, seed=3)) == epoch0
    flipping.set_epoch(1)
    assert flips(flipping) != epoch0
    # Worker processes draw the same flips as the main process.
    loader = torch.utils.data.DataLoader(flipping, batch_size=4, num_workers=2, collate_fn=collate_train_batch)
    in_workers = torch.cat([batch["pixel_values"] for batch in loader])
    assert torch.equal(in_workers, torch.stack([flipping[i]["pixel_values"] for i in range(16)]))


def test_datasets_sources(tmp_path):
    images = [random_image(20, 24, seed=i) for i in range(3)]
    features = datasets.Features(
        {"img": datasets.Image(), "cls": datasets.Value("int64"), "extra": datasets.Value("string")}
    )
    table = datasets.Dataset.from_dict({"img": images, "cls": [2, 0, 2], "extra": ["x", "y", "z"]}, features=features)
    # A local dataset repository (what a Hub dataset is), read by datasets.load_dataset.
    table.to_parquet(str(tmp_path / "repo" / "train.parquet"))
    # A save_to_disk folder, as a DatasetDict.
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    for name in ("repo", "saved"):
        dataset = load_train_dataset(
            dataset_name=str(tmp_path / name), image_column="img", label_column="cls", resolution=16, random_flip=False
        )
        assert len(dataset) == 3 and dataset.class_names == ["0", "1", "2"]
        assert [dataset[i]["class_labels"].item() for i in range(3)] == [2, 0, 2]
        expected = np.asarray(center_crop_arr(images[1], 16)).transpose(2, 0, 1)
        np.testing.assert_array_equal(dataset[1]["pixel_values"].numpy(), expected)
    with pytest.raises(ValueError, match="split 'validation'"):
        load_train_dataset(
            dataset_name=str(tmp_path / "saved"), image_column="img", label_column="cls", split="validation"
        )
    with pytest.raises(ValueError, match="image_column 'image'"):
        load_train_dataset(dataset_name=str(tmp_path / "saved"), label_column="cls")
    with pytest.raises(ValueError, match="label_column 'label'"):
        load_train_dataset(dataset_name=str(tmp_path / "saved"), image_column="img")
    with pytest.raises(ValueError, match="image_column 'extra'.*expected an Image feature"):
        load_train_dataset(dataset_name=str(tmp_path / "saved"), image_column="extra", label_column="cls")
    with pytest.raises(ValueError, match="label_column 'extra'.*expected integer class ids"):
        load_train_dataset(dataset_name=str(tmp_path / "saved"), image_column="img", label_column="extra")


def test_bad_arguments(image_folder, tmp_path):
    with pytest.raises(ValueError, match="exactly one of train_data_dir"):
        load_train_dataset()
    with pytest.raises(ValueError, match="exactly one of train_data_dir"):
        load_train_dataset(train_data_dir=str(image_folder), dataset_name="some/dataset")
    for resolution in (0, -8, 16.0):
        with pytest.raises(ValueError, match="resolution must be a positive int"):
            load_train_dataset(train_data_dir=str(image_folder), resolution=resolution)
    with pytest.raises(ValueError, match="no class subfolders"):
        load_train_dataset(train_data_dir=str(image_folder / "cat" / "nested"))
    with pytest.raises(ValueError, match="is not a directory"):
        load_train_dataset(train_data_dir=str(tmp_path / "missing"))


def test_prepare_dataset_matches_on_the_fly_crops(image_folder, tmp_path, capsys):
    output_dir = tmp_path / "prepared"
    prepare_dataset.main([
        "--train_data_dir", str(image_folder), "--resolution", "16", "--output_dir", str(output_dir), "--num_proc", "2",
    ])
    printed = capsys.readouterr().out
    assert "holds 3 images (1 shards written now); skipped 1 unreadable" in printed
    assert sorted(os.listdir(tmp_path)) == ["images", "prepared"]
    assert sorted(os.listdir(output_dir)) == ["prepared.json", "train-00000-of-00001.arrow"]
    prepared = load_train_dataset(dataset_name=str(output_dir), resolution=16, random_flip=False)
    # Training memory-maps the shard itself: there is no second copy.
    assert prepared.table.cache_files == [{"filename": str(output_dir / "train-00000-of-00001.arrow")}]
    on_the_fly = load_train_dataset(train_data_dir=str(image_folder), resolution=16, random_flip=False)
    assert prepared.precropped and prepared.class_names == ["ant", "cat"] and len(prepared) == 3
    readable = [item for item in (on_the_fly[i] for i in range(4)) if item is not None]
    for i, expected in enumerate(readable):
        assert torch.equal(prepared[i]["pixel_values"], expected["pixel_values"])
        assert prepared[i]["class_labels"].item() == expected["class_labels"].item()
    flipping = load_train_dataset(dataset_name=str(output_dir), resolution=16, seed=5)
    assert all(
        torch.equal(flipping[i]["pixel_values"], prepared[i]["pixel_values"])
        or torch.equal(flipping[i]["pixel_values"], prepared[i]["pixel_values"].flip(2))
        for i in range(3)
    )
    with pytest.raises(ValueError, match="holds 16 px images, but resolution=32"):
        load_train_dataset(dataset_name=str(output_dir), resolution=32)


def test_prepare_dataset_cli_bad_input_is_one_line(tmp_path):
    missing = str(tmp_path / "missing")
    command = [sys.executable, str(PREPARE_SCRIPT), "--train_data_dir", missing, "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    expected = f"prepare_dataset.py: error: train_data_dir {missing!r} is not a directory"
    assert result.stderr.strip().splitlines() == [expected]


def test_quickstart_digits(tmp_path):
    from sklearn.datasets import load_digits

    make_quickstart_dataset(str(tmp_path / "digits"), resolution=16)
    assert sorted(os.listdir(tmp_path / "digits")) == [str(digit) for digit in range(10)]
    dataset = load_train_dataset(train_data_dir=str(tmp_path / "digits"), resolution=16, random_flip=False)
    digits = load_digits()
    assert len(dataset) == len(digits.images) == 1797 and dataset.class_names == [str(d) for d in range(10)]
    # Files are named by their index in load_digits; each is the upscaled digit in gray RGB.
    path = tmp_path / "digits" / "7" / f"{int(np.flatnonzero(digits.target == 7)[0]):04d}.png"
    image = np.asarray(Image.open(path))
    assert image.shape == (16, 16, 3) and (image[..., 0] == image[..., 2]).all()
    downscaled = np.asarray(Image.fromarray(image[..., 0]).resize((8, 8), resample=Image.BOX), dtype=float)
    original = digits.images[np.flatnonzero(digits.target == 7)[0]] * 255 / 16
    assert np.corrcoef(downscaled.ravel(), original.ravel())[0, 1] > 0.9
    labels = collate_train_batch([dataset[i] for i in range(0, 1797, 50)])["class_labels"]
    assert labels.tolist() == sorted(digits.target)[::50]
    # Deterministic: a second build writes identical files.
    make_quickstart_dataset(str(tmp_path / "again"), resolution=16)
    assert path.read_bytes() == (tmp_path / "again" / "7" / path.name).read_bytes()


def hub_layout(root, class_label, num_shards=2, per_shard=3):
    """A local datasets repository laid out as the Hub's imagenet-1k: data/train-0000k-of-0000n.parquet shards with an
    `image` (Image) and a `label` (ClassLabel, or integer ids) column."""
    label = datasets.ClassLabel(names=["ant", "bee", "cat"]) if class_label else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label})
    for shard in range(num_shards):
        images = [random_image(20, 24, seed=shard * per_shard + i) for i in range(per_shard)]
        labels = [(shard * per_shard + i) % 3 for i in range(per_shard)]
        table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        table.to_parquet(str(root / "data" / f"train-{shard:05d}-of-{num_shards:05d}.parquet"))
    return root


@pytest.mark.parametrize("class_label", [True, False])
def test_the_hub_imagenet_layout_loads_with_the_default_columns(tmp_path, class_label):
    repo = hub_layout(tmp_path / "repo", class_label)
    cache = tmp_path / "cache"
    dataset = load_train_dataset(dataset_name=str(repo), resolution=16, random_flip=False, cache_dir=str(cache))
    assert len(dataset) == 6
    assert dataset.class_names == (["ant", "bee", "cat"] if class_label else ["0", "1", "2"])
    assert [dataset[i]["class_labels"].item() for i in range(6)] == [0, 1, 2, 0, 1, 2]
    expected = np.asarray(center_crop_arr(random_image(20, 24, seed=4), 16)).transpose(2, 0, 1)
    np.testing.assert_array_equal(dataset[4]["pixel_values"].numpy(), expected)
    # The table is the one datasets built from the shards: no column cast rewrote it (map writes cache-*.arrow).
    source = datasets.load_dataset(str(repo), split="train", cache_dir=str(cache))
    assert dataset.table.cache_files == source.cache_files
    assert not list(cache.rglob("cache-*.arrow"))


def test_a_parquet_repository_without_the_split_is_one_line_before_any_conversion(tmp_path, capsys):
    repo = hub_layout(tmp_path / "repo", class_label=True)
    for shard in (repo / "data").iterdir():
        shard.rename(shard.with_name(shard.name.replace("train", "validation")))
    cache = tmp_path / "cache"
    capsys.readouterr()
    code = prepare_dataset.main(["--dataset_name", str(repo), "--resolution", "16", "--output_dir",
                                 str(tmp_path / "prepared"), "--cache_dir", str(cache)])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1
    assert error == f"prepare_dataset.py: error: split 'train' is not in {str(repo)!r}; available: ['validation']\n"
    assert not list(cache.rglob("*.arrow"))  # nothing converted
    assert len(load_train_dataset(dataset_name=str(repo), split="validation", resolution=16, cache_dir=str(cache))) == 6


def webdataset_layout(root, shards=2, per_shard=3):
    """WebDataset tar shards: <key>.jpg and <key>.cls (the class id as text) per image."""
    (root / "data").mkdir(parents=True)
    for shard in range(shards):
        with tarfile.open(root / "data" / f"train-{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                image = io.BytesIO()
                random_image(20, 24, seed=shard * per_shard + i).save(image, format="PNG")
                for name, data in ((f"{shard:02d}{i:04d}.jpg", image.getvalue()), (f"{shard:02d}{i:04d}.cls",
                                                                                   str(i % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def test_webdataset_shards_load_and_name_the_keys_found(tmp_path):
    repo = webdataset_layout(tmp_path / "shards")
    cache = str(tmp_path / "cache")
    dataset = load_train_dataset(dataset_name=str(repo), image_column="jpg", label_column="cls", resolution=16,
                                 random_flip=False, cache_dir=cache)
    assert len(dataset) == 6 and dataset.class_names == ["0", "1", "2"]
    assert [dataset[i]["class_labels"].item() for i in range(6)] == [0, 1, 2, 0, 1, 2]
    expected = np.asarray(center_crop_arr(random_image(20, 24, seed=4), 16)).transpose(2, 0, 1)
    np.testing.assert_array_equal(dataset[4]["pixel_values"].numpy(), expected)
    with pytest.raises(ValueError, match=r"^image_column 'png' is not a column of .*; columns: \['jpg', 'cls', "
                                         r"'__key__', '__url__'\]$"):
        load_train_dataset(dataset_name=str(repo), image_column="png", label_column="cls", cache_dir=cache)


def saved_layout(root):
    """A save_to_disk folder with an `image` (Image) and a `label` (ClassLabel) column."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee", "cat"])})
    images = [random_image(20, 24, seed=i) for i in range(6)]
    datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(6)]}, features=features).save_to_disk(
        str(root))
    return root


# Each holds the same 6 images with labels 0, 1, 2, 0, 1, 2: (build, columns, class names). The image folder is in
# test_prepare_dataset_matches_on_the_fly_crops.
LAYOUTS = {
    "hub ClassLabel": (lambda root: hub_layout(root, class_label=True), {}, ["ant", "bee", "cat"]),
    "hub int64": (lambda root: hub_layout(root, class_label=False), {}, ["0", "1", "2"]),
    "save_to_disk": (saved_layout, {}, ["ant", "bee", "cat"]),
    "webdataset": (webdataset_layout, {"image_column": "jpg", "label_column": "cls"}, ["0", "1", "2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prepare_dataset_reads_every_datasets_layout(tmp_path, layout):
    build, columns, class_names = LAYOUTS[layout]
    source, cache, output_dir = build(tmp_path / "source"), str(tmp_path / "cache"), tmp_path / "prepared"
    flags = [argument for column, name in columns.items() for argument in (f"--{column}", name)]
    assert prepare_dataset.main(["--dataset_name", str(source), *flags, "--resolution", "16", "--shard_size", "4",
                                 "--output_dir", str(output_dir), "--cache_dir", cache]) == 0
    assert sorted(os.listdir(output_dir)) == ["prepared.json", *prepared_shard_names(2)]
    prepared = load_train_dataset(dataset_name=str(output_dir), resolution=16, random_flip=False)
    on_the_fly = load_train_dataset(dataset_name=str(source), resolution=16, random_flip=False, cache_dir=cache,
                                    **columns)
    assert prepared.class_names == class_names and len(prepared) == 6
    assert [prepared[i]["class_labels"].item() for i in range(6)] == [0, 1, 2, 0, 1, 2]
    for i in range(6):
        assert torch.equal(prepared[i]["pixel_values"], on_the_fly[i]["pixel_values"])


def test_prepare_dataset_resumes_after_a_crash_without_rewriting_finished_shards(tmp_path):
    """SIGKILLs the CLI while a worker is stuck in the last shard (its last image is a FIFO no one writes to), then
    runs it again: the finished shards stay as they were, and the output equals an uninterrupted run's."""
    root, output_dir = tmp_path / "images", tmp_path / "prepared"
    for i in range(7):
        (root / "ab"[i // 4]).mkdir(parents=True, exist_ok=True)
        random_image(20 + i, 24, seed=i).save(root / "ab"[i // 4] / f"{i}.png")
    fifo = root / "b" / "9.png"
    os.mkfifo(fifo)
    arguments = ["--train_data_dir", str(root), "--resolution", "16", "--shard_size", "2", "--num_proc", "2"]
    command = [sys.executable, str(PREPARE_SCRIPT), *arguments, "--output_dir", str(output_dir)]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    shards = [output_dir / name for name in prepared_shard_names(4)]
    in_flight = output_dir / f"{shards[3].name}.tmp"
    deadline = time.monotonic() + 120
    while not (all(shard.exists() for shard in shards[:3]) and in_flight.exists()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not shards[3].exists()
    finished = {shard: (shard.stat().st_ino, shard.stat().st_mtime_ns) for shard in shards[:3]}

    fifo.unlink()
    random_image(30, 24, seed=9).save(fifo)
    assert prepare_dataset.main([*arguments, "--output_dir", str(output_dir)]) == 0
    assert {shard: (shard.stat().st_ino, shard.stat().st_mtime_ns) for shard in shards[:3]} == finished
    assert prepare_dataset.main([*arguments, "--output_dir", str(tmp_path / "uninterrupted")]) == 0
    names = sorted(os.listdir(output_dir))
    assert names == ["prepared.json", *(shard.name for shard in shards)]  # the partial shard is gone
    assert names == sorted(os.listdir(tmp_path / "uninterrupted"))
    for name in names:
        assert (output_dir / name).read_bytes() == (tmp_path / "uninterrupted" / name).read_bytes()


def test_prepare_dataset_bad_input_and_partial_output_are_one_line(image_folder, tmp_path, capsys):
    output_dir = tmp_path / "prepared"

    def error_line(*arguments, output=output_dir):
        code = prepare_dataset.main(["--train_data_dir", str(image_folder), "--output_dir", str(output), *arguments])
        error = capsys.readouterr().err
        assert code == 1 and error.count("\n") == 1
        return error.strip().removeprefix("prepare_dataset.py: error: ")

    assert error_line("--num_proc", "0") == "num_proc must be >= 1, got 0"
    assert error_line("--shard_size", "0") == "shard_size must be >= 1, got 0"
    assert prepare_dataset.main(["--train_data_dir", str(image_folder), "--output_dir", str(output_dir),
                                 "--resolution", "16", "--shard_size", "2"]) == 0
    capsys.readouterr()
    assert error_line("--resolution", "8", "--shard_size", "2") == (
        f"output_dir {str(output_dir)!r} holds a run with resolution 16; this run has resolution 8: "
        "pass another output_dir")
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    assert error_line(output=unrelated) == (
        f"output_dir {str(unrelated)!r} holds no prepared.json, so it is not a run of this script; expected a new or "
        "empty folder, found ['notes.txt']")
    # A run cut short does not load; the same command finishes it.
    (output_dir / "train-00001-of-00002.arrow").unlink()
    with pytest.raises(ValueError, match=r"holds 1 of the 2 shards of training/prepare_dataset.py; run the same "
                                         "command again to finish it"):
        load_train_dataset(dataset_name=str(output_dir), resolution=16)
    capsys.readouterr()
    assert prepare_dataset.main(["--train_data_dir", str(image_folder), "--output_dir", str(output_dir),
                                 "--resolution", "16", "--shard_size", "2"]) == 0
    assert "holds 3 images (1 shards written now)" in capsys.readouterr().out


def test_prepare_dataset_uses_the_cores_it_may_run_on_by_default():
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        assert prepare_dataset.parse_args(["--output_dir", "out"]).num_proc == 1
    finally:
        os.sched_setaffinity(0, cores)
    assert prepare_dataset.parse_args(["--output_dir", "out"]).num_proc == len(cores)
