"""Folder data decoded lazily by the loader's workers (the same pixels as the written files), the choice for
unreadable files (refuse naming it, or skip and report), and the random horizontal flip (training only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mulan.lightning.data import ImageFolderDataModule, SuperResolutionDataModule, SyntheticDataModule
from mulan.lightning.data.folder import FolderImages


def write(folder: Path, n: int, suffix: str = "png", size: int = 8) -> tuple[list[Path], np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    paths = [folder / f"img_{i:02d}.{suffix}" for i in range(n)]
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(path, quality=95) if suffix == "jpg" else Image.fromarray(image).save(path)
    return paths, images


def test_workers_decode_the_written_pixels_in_split_order(tmp_path: Path) -> None:
    paths, images = write(tmp_path, 12)
    data = ImageFolderDataModule(str(tmp_path), val_fraction=0.25, test_fraction=0.25, num_workers=2, batch_size=3)
    data.setup()
    assert isinstance(data.datasets["val"], FolderImages)  # nothing decoded at setup
    for split, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
        got = torch.cat(list(loader))
        expected = torch.stack([torch.from_numpy(images[paths.index(f)]).permute(2, 0, 1) for f in data.files[split]])
        assert torch.equal(got, expected), split


def test_a_file_of_the_wrong_size_is_refused_when_read_naming_it(tmp_path: Path) -> None:
    paths, _ = write(tmp_path, 6)
    data = ImageFolderDataModule(str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    data.setup()  # the headers agree
    Image.fromarray(np.zeros((5, 8, 3), dtype=np.uint8)).save(paths[0])  # changed after setup
    with pytest.raises(ValueError, match=rf"different sizes.*{paths[0].name} is 8x5.*image_size"):
        data.read_image(paths[0])


def test_an_unreadable_file_is_refused_by_default_and_skipped_with_the_count_when_asked(tmp_path: Path) -> None:
    write(tmp_path, 9)
    for name in ("broken_a.png", "broken_b.png"):
        (tmp_path / name).write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"cannot read the image .*broken_a\.png .*on_unreadable: skip"):
        ImageFolderDataModule(str(tmp_path)).setup()
    data = ImageFolderDataModule(str(tmp_path), on_unreadable="skip")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable file\(s\).*broken_a\.png, broken_b\.png"):
        data.setup()
    every = [f.name for split in ("train", "val", "test") for f in data.files[split]]
    assert sorted(set(every)) == [f"img_{i:02d}.png" for i in range(9)]
    assert data.split_record()["skipped"] == ["broken_a.png", "broken_b.png"]
    assert sum(len(b) for b in data.train_dataloader()) + len(data.datasets["val"]) + len(data.datasets["test"]) >= 9


def test_a_file_that_fails_when_decoded_is_named_or_skipped(tmp_path: Path) -> None:
    """A JPEG cut short keeps a whole header (setup's check passes); decoding it fails in the loader."""
    paths, _ = write(tmp_path / "train", 4, "jpg", size=32)
    write(tmp_path / "val", 2, "jpg", size=32)
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: len(whole) * 2 // 3])
    refuse = ImageFolderDataModule(str(tmp_path), batch_size=4)
    refuse.setup("fit")
    with pytest.raises(ValueError, match=rf"cannot read the image {paths[1]} .*Delete or replace"):
        list(refuse.train_dataloader())
    skip = ImageFolderDataModule(str(tmp_path), batch_size=4, on_unreadable="skip")
    skip.setup("fit")
    with pytest.warns(UserWarning, match=rf"cannot read the image {paths[1]} .*Skipped"):
        (batch,) = list(skip.train_dataloader())
    assert batch.shape == (3, 3, 32, 32)  # the batch is one image short


def test_random_flip_mirrors_about_half_the_training_images_and_never_val(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = SyntheticDataModule(shape=(1, 3, 5), num_train=400, num_eval=16, batch_size=400, random_flip=True)
    data.setup()
    originals = data.datasets["train"].images
    index = {im.numpy().tobytes(): i for i, im in enumerate(originals)}
    (batch,) = list(data.train_dataloader())
    flipped = 0
    for image in batch:
        if image.numpy().tobytes() in index:
            continue
        mirrored = torch.flip(image, dims=(-1,))  # a flipped image is the mirror of an original
        assert mirrored.numpy().tobytes() in index
        flipped += 1
    assert 140 <= flipped <= 260  # Binomial(400, 1/2): mean 200, sd 10
    assert torch.equal(torch.cat(list(data.val_dataloader())), data.datasets["val"].images)
    assert torch.equal(torch.cat(list(data.test_dataloader())), data.datasets["test"].images)
    plain = SyntheticDataModule(shape=(1, 3, 5), num_train=400, num_eval=16, batch_size=400)
    plain.setup("fit")
    (batch,) = list(plain.train_dataloader())
    assert all(im.numpy().tobytes() in index for im in batch)  # off by default


def test_random_flip_mirrors_an_image_and_its_condition_together() -> None:
    torch.manual_seed(1)
    data = SuperResolutionDataModule(factor=2, image_size=8, batch_size=64, random_flip=True)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    from mulan.lightning.data.superres import downsample

    assert torch.equal(y, downsample(x, 2))  # y is still the downsampled x, flipped or not
