"""Bring your own images: a folder of PNG/JPEG files and .npz/.npy arrays, through configs/folder.yaml end to end
(fit, then test from the checkpoint alone), the exact pixels each split holds, and every refusal with the file
and the option that fixes it named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mulan.cli import build_cli
from mulan.data import hash_split
from mulan.lightning.data import ArrayDataModule, ImageFolderDataModule

ROOT = Path(__file__).parents[1]
FOLDER_CONFIG = ROOT / "configs" / "folder.yaml"
# configs/folder.yaml shrunk to a few seconds: a tiny U-Net, 2 steps, no logger
FAST = [
    "--model.init_args.denoiser.init_args.channels=8",
    "--model.init_args.denoiser.init_args.num_blocks=1",
    "--model.init_args.process.init_args.hidden=8",
    "--model.init_args.latent.init_args.m=6",
    "--model.init_args.latent.init_args.k=2",
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.logger=false",
    "--trainer.accelerator=cpu",
    "--data.init_args.batch_size=8",
]
THREE = {"val_fraction": 0.34, "test_fraction": 0.34}
"""Split fractions that give three images one per split."""


def pixels(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_pngs(folder: Path, images: np.ndarray, prefix: str = "img") -> list[Path]:
    """``images`` (N, H, W) or (N, H, W, 3) as PNG files ``<prefix>_<i>.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{prefix}_{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def as_nchw(image: np.ndarray) -> torch.Tensor:
    array = image[..., None] if image.ndim == 2 else image
    return torch.from_numpy(array).permute(2, 0, 1)


def decoded(dataset) -> torch.Tensor:
    """Every item of a lazily decoded split, through its ``__getitem__`` (what the loader's workers call)."""
    return torch.stack([dataset[i] for i in range(len(dataset))])


def fit_and_test(root: Path, data_args: list[str]) -> tuple[object, object]:
    """``mulan-cli fit --config configs/folder.yaml`` (shrunk), then ``mulan-cli test`` from its checkpoint alone."""
    fitted = build_cli(
        ["fit", "--config", str(FOLDER_CONFIG), *data_args, *FAST, "--trainer.default_root_dir", str(root)]
    )
    ckpt = sorted(root.rglob("last.ckpt"))[-1]
    tested = build_cli(
        ["test", "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    )
    return fitted, tested


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("shape", [(8, 8, 3), (8, 8)], ids=["rgb", "grayscale"])
def test_folder_of_pngs_fit_then_test_from_checkpoint(shape: tuple[int, ...], tmp_path: Path) -> None:
    """The newcomer's recipe on PNGs the test writes: the data module reads exactly the written pixels, fit runs
    (with the test after fit), and test rebuilds the same folder data from the checkpoint alone."""
    images = pixels(20, shape)
    paths = write_pngs(tmp_path / "images", images)
    fitted, tested = fit_and_test(
        tmp_path, ["--data.init_args.root", str(tmp_path / "images"), "--data.init_args.image_size", "null"]
    )
    channels = 3 if len(shape) == 3 else 1
    data = fitted.datamodule
    assert isinstance(data, ImageFolderDataModule) and data.image_shape == (channels, 8, 8)
    assert fitted.model.model.image_shape == (channels, 8, 8)  # linked into the model
    parts = hash_split([p.name for p in paths], 0.1, 0.1, 0)
    for split in ("train", "val"):
        assert data.files[split] == [paths[int(i)] for i in parts[split]]
        expected = torch.stack([as_nchw(images[int(i)]) for i in parts[split]])
        assert torch.equal(decoded(data.datasets[split]), expected), split  # the bytes written, in split order
    assert fitted.trainer.global_step == 2
    assert np.isfinite(fitted.model.test_results["total"][0])  # test_after_fit: true in configs/folder.yaml
    rebuilt = tested.datamodule
    assert isinstance(rebuilt, ImageFolderDataModule) and rebuilt.files == data.files
    expected_test = torch.stack([as_nchw(images[int(i)]) for i in parts["test"]])
    assert torch.equal(decoded(rebuilt.datasets["test"]), expected_test)
    assert np.isfinite(tested.model.test_results["total"][0])


def test_npz_fit_then_test_from_checkpoint(tmp_path: Path) -> None:
    """An .npz with train/val/test arrays (NHWC) through the same recipe: each split holds its array exactly."""
    arrays = {"train": pixels(16, (8, 8, 3), 1), "val": pixels(4, (8, 8, 3), 2), "test": pixels(5, (8, 8, 3), 3)}
    path = tmp_path / "images.npz"
    np.savez(path, **arrays)
    data_arg = "--data=" + json.dumps(
        {"class_path": "mulan.lightning.data.ArrayDataModule", "init_args": {"path": str(path), "batch_size": 8}}
    )
    fitted, tested = fit_and_test(tmp_path, [data_arg])
    assert fitted.datamodule.image_shape == (3, 8, 8)
    for split in ("train", "val"):
        expected = torch.from_numpy(arrays[split]).permute(0, 3, 1, 2)
        assert torch.equal(fitted.datamodule.datasets[split].images, expected), split
    assert isinstance(tested.datamodule, ArrayDataModule)
    assert torch.equal(tested.datamodule.datasets["test"].images, torch.from_numpy(arrays["test"]).permute(0, 3, 1, 2))
    assert len(tested.model.test_results) > 0 and np.isfinite(tested.model.test_results["total"][0])


# ------------------------------------------------------------------------------------------------ folder options
def test_given_sub_folders_are_the_splits_and_a_missing_val_uses_test(tmp_path: Path) -> None:
    train = write_pngs(tmp_path / "train", pixels(3, (4, 4, 3)))
    test = write_pngs(tmp_path / "test" / "class_a", pixels(2, (4, 4, 3), 1))  # searched recursively
    write_pngs(tmp_path / "test", pixels(1, (4, 4, 3), 2), prefix="z")
    data = ImageFolderDataModule(str(tmp_path))
    assert data.files["train"] == train
    assert data.files["test"] == [*test, tmp_path / "test" / "z_000.png"]
    assert data.files["val"] == data.files["test"]


def test_centre_crop_and_resize(tmp_path: Path) -> None:
    """A 12x8 (W x H) image: crop 'centre' keeps columns 2..9 (exactly, at image_size 8); a 16x16 image of 2x2
    blocks resized to 8x8 with 'nearest' gives one value per block; crop 'none' squeezes the width."""
    wide = np.zeros((8, 12, 3), dtype=np.uint8)
    wide[:, 2:10] = pixels(1, (8, 8, 3))[0]
    wide[:, :2], wide[:, 10:] = 255, 255
    blocks = np.kron(pixels(1, (8, 8), 1)[0], np.ones((2, 2), dtype=np.uint8))
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(wide).save(folder / "a_wide.png")
    Image.fromarray(blocks).convert("RGB").save(folder / "b_blocks.png")
    Image.fromarray(pixels(1, (8, 8, 3))[0]).save(folder / "c_square.png")
    data = ImageFolderDataModule(str(folder), image_size=8, interpolation="nearest", **THREE)
    assert data.image_shape == (3, 8, 8)
    assert np.array_equal(data.read_image(folder / "a_wide.png"), wide[:, 2:10])
    assert np.array_equal(data.read_image(folder / "b_blocks.png")[..., 0], blocks[::2, ::2])
    stretched = ImageFolderDataModule(str(folder), image_size=8, crop="none", interpolation="nearest", **THREE)
    assert (stretched.read_image(folder / "a_wide.png")[:, 0] == 255).all()  # the margin survives the squeeze


def test_convert_makes_one_colour_mode(tmp_path: Path) -> None:
    gray = pixels(1, (4, 4))[0]
    Image.fromarray(pixels(1, (4, 4, 3))[0]).save(tmp_path / "a.png")
    Image.fromarray(gray).save(tmp_path / "b.png")
    Image.fromarray(gray).save(tmp_path / "c.png")
    data = ImageFolderDataModule(str(tmp_path), channels=3, convert=True, **THREE)
    data.check_files()
    assert np.array_equal(data.read_image(tmp_path / "b.png"), np.repeat(gray[..., None], 3, axis=2))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A photo stored 8 wide x 4 high with EXIF orientation 6 (rotate 90 degrees) is read 4 wide x 8 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(pixels(1, (4, 8, 3))[0]).save(tmp_path / name, exif=exif)
    data = ImageFolderDataModule(str(tmp_path), val_fraction=0.25, test_fraction=0.25)
    assert data.image_shape == (3, 8, 4)
    assert data.read_image(tmp_path / "a.png").shape == (8, 4, 3)


# ------------------------------------------------------------------------------------------------ folder errors
def test_mixed_sizes_without_image_size_refused_before_training(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_pngs(images, pixels(6, (8, 8, 3)))
    Image.fromarray(pixels(1, (6, 10, 3))[0]).save(images / "odd.png")
    with pytest.raises(ValueError, match=r"different sizes: .*img_00\d\.png is 8x8 and .*odd\.png is 10x6") as error:
        build_cli(
            ["fit", "--config", str(FOLDER_CONFIG), *FAST, "--data.init_args.root", str(images),
             "--data.init_args.image_size", "null", "--trainer.default_root_dir", str(tmp_path)]
        )  # fmt: skip
    assert "--data.init_args.image_size" in str(error.value)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    write_pngs(tmp_path, pixels(9, (4, 4, 3)))
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"cannot read the image .*broken\.png .*Delete or replace the file"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")


def test_truncated_file_is_named_when_decoded(tmp_path: Path) -> None:
    """A PNG cut short keeps a valid header, so it passes setup's header check and fails only when the loader
    decodes its pixels: still named."""
    paths = write_pngs(tmp_path, pixels(5, (32, 32, 3)))
    paths[0].write_bytes(paths[0].read_bytes()[:100])
    data = ImageFolderDataModule(str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ValueError, match=rf"cannot read the image {re.escape(str(paths[0]))} .*Delete or replace"):
        data.setup()  # PIL reads a whole PNG to find its EXIF data, so the header check may catch it already
        for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
            list(loader)


@pytest.mark.parametrize("make", ["missing", "empty", "other_files"])
def test_empty_or_missing_folder(make: str, tmp_path: Path) -> None:
    root = tmp_path / "images"
    if make != "missing":
        root.mkdir()
    if make == "other_files":
        (root / "notes.txt").write_text("no images here")
        (root / ".hidden.png").write_bytes(b"")
    error = FileNotFoundError if make == "missing" else ValueError
    match = r"does not exist.*--data.init_args.root" if make == "missing" else r"no images under .*`extensions`"
    with pytest.raises(error, match=match):
        ImageFolderDataModule(str(root))


def test_grayscale_file_with_channels_3_names_the_file_and_both_fixes(tmp_path: Path) -> None:
    write_pngs(tmp_path, pixels(9, (4, 4, 3)))
    Image.fromarray(pixels(1, (4, 4))[0]).save(tmp_path / "gray.png")
    with pytest.raises(
        ValueError,
        match=r"gray\.png is grayscale \(PIL mode 'L'\) but channels=3 \(image_shape \(3, 4, 4\)\)\. Set "
        r"`channels: 1`.* or set `convert: true`",
    ):
        ImageFolderDataModule(str(tmp_path), channels=3).setup("fit")


def test_mixed_colour_modes_name_both_files(tmp_path: Path) -> None:
    write_pngs(tmp_path, pixels(9, (4, 4)))  # grayscale first
    Image.fromarray(pixels(1, (4, 4, 3))[0]).save(tmp_path / "z_colour.png")
    with pytest.raises(ValueError, match=r"mix colour modes: .*img_00\d\.png is grayscale.*z_colour\.png is colour"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")


def test_sixteen_bit_image_is_refused(tmp_path: Path) -> None:
    for name in ("deep_a.png", "deep_b.png", "deep_c.png"):
        Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(tmp_path / name)
    with pytest.raises(ValueError, match=r"deep_.\.png is not an 8-bit image.*save it as an 8-bit"):
        ImageFolderDataModule(str(tmp_path), **THREE)


def test_too_few_images_for_the_split(tmp_path: Path) -> None:
    """Two images cannot fill three splits (from three on, a split the hash leaves empty takes one image)."""
    write_pngs(tmp_path, pixels(2, (4, 4, 3)))
    with pytest.raises(ValueError, match=r"2 images .* give \d train, \d val, \d test images.*raise the fraction"):
        ImageFolderDataModule(str(tmp_path))
    write_pngs(tmp_path, pixels(3, (4, 4, 3)))
    data = ImageFolderDataModule(str(tmp_path))
    assert [len(data.files[split]) for split in ("train", "val", "test")] == [1, 1, 1]


# ------------------------------------------------------------------------------------------------ arrays
@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npy_layouts_and_the_split_by_seed(layout: str, tmp_path: Path) -> None:
    nchw = pixels(10, (3 if layout != "NHW" else 1, 5, 6))
    array = {"NHWC": nchw.transpose(0, 2, 3, 1), "NCHW": nchw, "NHW": nchw[:, 0]}[layout]
    np.save(tmp_path / "x.npy", array)
    data = ArrayDataModule(str(tmp_path / "x.npy"), val_fraction=0.2, test_fraction=0.2, seed=3)
    assert data.image_shape == nchw.shape[1:]
    data.setup()
    parts = hash_split([str(i) for i in range(10)], 0.2, 0.2, 3)
    for split in ("train", "val", "test"):
        assert torch.equal(data.datasets[split].images, torch.from_numpy(nchw[parts[split].numpy()])), split


def test_npz_with_one_named_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=pixels(10, (4, 4, 3)), labels=np.arange(10))
    with pytest.raises(ValueError, match=r"several arrays \['images', 'labels'\]: set `key` \(--data.init_args.key"):
        ArrayDataModule(str(tmp_path / "x.npz"))
    assert ArrayDataModule(str(tmp_path / "x.npz"), key="images").image_shape == (3, 4, 4)


def test_float_array_is_refused_with_the_fix(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((10, 4, 4, 3)).astype(np.float32))
    with pytest.raises(TypeError, match=r"x\.npy has dtype float32.*save uint8 values 0\.\.255"):
        ArrayDataModule(str(tmp_path / "x.npy"))


def test_ambiguous_layout_asks_for_layout(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", pixels(10, (3, 4, 3)))
    with pytest.raises(ValueError, match=r"shape \(10, 3, 4, 3\).*Set `layout` to 'NCHW' or 'NHWC'"):
        ArrayDataModule(str(tmp_path / "x.npy"))
    assert ArrayDataModule(str(tmp_path / "x.npy"), layout="NHWC").image_shape == (3, 3, 4)


def test_npz_splits_of_different_shapes_or_missing_eval_split(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", train=pixels(4, (4, 4, 3)), test=pixels(2, (5, 5, 3)))
    with pytest.raises(ValueError, match=r"different shapes \(C, H, W\): 'test': \(3, 5, 5\), 'train': \(3, 4, 4\)"):
        ArrayDataModule(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", train=pixels(4, (4, 4, 3)))
    with pytest.raises(ValueError, match=r"has an array 'train' but neither 'val' nor 'test'"):
        ArrayDataModule(str(tmp_path / "b.npz"))


def test_missing_or_corrupt_array_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npz does not exist.*--data.init_args.path"):
        ArrayDataModule(str(tmp_path / "nowhere.npz"))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"cannot read .*bad\.npz as a \.npy/\.npz file"):
        ArrayDataModule(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------------------------------------ stable splits
def test_adding_images_moves_no_file_between_splits(tmp_path: Path) -> None:
    """The split is a hash of each file's relative path: adding one image (or ten more, in a sub-folder) leaves
    every earlier file in its split (randperm(n) moved 4 of 5 test images into train)."""
    write_pngs(tmp_path, pixels(50, (4, 4, 3)))
    before = ImageFolderDataModule(str(tmp_path), val_fraction=0.1, test_fraction=0.1).files
    write_pngs(tmp_path, pixels(1, (4, 4, 3), seed=1), prefix="new")
    write_pngs(tmp_path / "more", pixels(10, (4, 4, 3), seed=2))
    after = ImageFolderDataModule(str(tmp_path), val_fraction=0.1, test_fraction=0.1).files
    for split in ("train", "val", "test"):
        assert set(before[split]) <= set(after[split]), split
    assert sum(len(files) for files in after.values()) == 61


def test_hash_split_fractions_and_partition() -> None:
    """Every key in exactly one split; split sizes within 4 binomial standard deviations of n * fraction; another
    seed gives another split."""
    keys = [f"photos/{i:05d}.png" for i in range(4000)]
    parts = hash_split(keys, 0.1, 0.25, seed=0)
    assert sorted(torch.cat(list(parts.values())).tolist()) == list(range(4000))
    for split, fraction in (("val", 0.1), ("test", 0.25), ("train", 0.65)):
        mean, sd = 4000 * fraction, (4000 * fraction * (1 - fraction)) ** 0.5
        assert abs(len(parts[split]) - mean) < 4 * sd, (split, len(parts[split]))
    assert not torch.equal(hash_split(keys, 0.1, 0.25, seed=1)["test"], parts["test"])


@pytest.mark.parametrize("kind", ["folder", "array"])
def test_the_split_is_written_to_the_run_directory(kind: str, tmp_path: Path) -> None:
    """At setup, attached to a trainer, the data module writes split.json into the trainer's log directory: every
    image once, in the split it was given."""
    import lightning as L

    if kind == "folder":
        write_pngs(tmp_path / "images", pixels(12, (4, 4, 3)))
        data = ImageFolderDataModule(str(tmp_path / "images"), val_fraction=0.2, test_fraction=0.2)
        expected = {s: [p.relative_to(tmp_path / "images").as_posix() for p in data.files[s]] for s in data.files}
        every = sorted(p.name for p in (tmp_path / "images").iterdir())
    else:
        np.save(tmp_path / "x.npy", pixels(12, (4, 4, 3)))
        data = ArrayDataModule(str(tmp_path / "x.npy"), val_fraction=0.2, test_fraction=0.2)
        expected = {s: data.indices[s].tolist() for s in data.indices}
        every = list(range(12))
    data.trainer = L.Trainer(default_root_dir=str(tmp_path / "run"), logger=False, accelerator="cpu")
    data.setup("fit")
    record = json.loads((tmp_path / "run" / "split.json").read_text())
    assert record["splits"] == expected
    assert sorted(sum(record["splits"].values(), [])) == every  # each image once
    assert record["seed"] == 0 and record["val_fraction"] == 0.2 and "SHA-256" in record["method"]
