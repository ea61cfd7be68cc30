"""Streaming data (litdata shards): the shard round trip, each rank its own part, a mid-epoch resume that continues
with the next unseen images (by the loader's state and through a Lightning fit), and the folder's split kept."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.data import has_iterable_dataset
from PIL import Image

from mulan.data import hash_split
from mulan.lightning.data import ImageFolderDataModule
from mulan.lightning.data.shards import main, write_shards
from mulan.lightning.data.streaming import ResumableStreamingLoader, StreamingDataModule

SHAPE = (3, 4, 4)
COUNTS = {"train": 16, "val": 4, "test": 5}


def unique_images(n: int, seed: int) -> np.ndarray:
    """``n`` distinct uint8 (C, H, W) images that differ from their mirror images."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    assert len({im.tobytes() for im in images}) == n
    return images


def key(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Shards of an .npz with given splits (NCHW), written once for the module."""
    folder = tmp_path_factory.mktemp("shards")
    arrays = {split: unique_images(n, seed) for seed, (split, n) in enumerate(COUNTS.items())}
    np.savez(folder / "images.npz", **arrays)
    write_shards(folder / "images.npz", str(folder / "out"), num_workers=1, start_method="fork")
    return folder / "out", arrays


def batches(loader, limit: int | None = None) -> list[torch.Tensor]:
    out = []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        out.append(batch)
    return out


def test_shard_round_trip_gives_the_exact_images_in_order(shards) -> None:
    out, arrays = shards
    metadata = json.loads((out / "mulan_shards.json").read_text())
    assert metadata["image_shape"] == list(SHAPE) and metadata["counts"] == COUNTS
    data = StreamingDataModule(str(out), batch_size=4, shuffle_seed=0)
    assert data.image_shape == SHAPE  # from the metadata, before any image is read
    data.setup()
    for split, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
        got = torch.cat(batches(loader))
        assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(arrays[split])), split  # in order
    train = torch.cat(batches(data.train_dataloader()))
    assert sorted(map(key, train)) == sorted(im.tobytes() for im in arrays["train"])  # each once, shuffled
    assert not torch.equal(train, torch.from_numpy(arrays["train"]))


def test_labels_of_an_npz_are_stored_with_their_images(tmp_path: Path) -> None:
    images, labels = unique_images(12, 7), np.arange(12) % 3
    np.savez(tmp_path / "a.npz", images=images, classes=labels)
    write_shards(tmp_path / "a.npz", str(tmp_path / "out"), key="images", labels="classes", val_fraction=0.25,
                 test_fraction=0.25, num_workers=1, start_method="fork")  # fmt: skip
    from litdata import StreamingDataset

    parts = hash_split([str(i) for i in range(12)], 0.25, 0.25, 0)
    for split in ("train", "val", "test"):
        dataset = StreamingDataset(str(tmp_path / "out" / split))
        items = [dataset[i] for i in range(len(dataset))]
        expected = parts[split].tolist()
        assert [it["image"].tobytes() for it in items] == [images[i].tobytes() for i in expected], split
        assert [it["label"] for it in items] == [int(labels[i]) for i in expected], split


def test_two_ranks_see_disjoint_parts_covering_the_train_set_once(shards, monkeypatch: pytest.MonkeyPatch) -> None:
    out, arrays = shards
    seen: dict[str, list[list[bytes]]] = {"train": [], "val": []}
    for rank in range(2):
        monkeypatch.setenv("WORLD_SIZE", "2")  # litdata's override of the distributed environment
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        data = StreamingDataModule(str(out), batch_size=2, shuffle_seed=3)
        data.setup("fit")
        loader = data.train_dataloader()
        assert has_iterable_dataset(loader)  # so Lightning never wraps it in a DistributedSampler
        seen["train"].append([key(im) for batch in loader for im in batch])
        seen["val"].append([key(im) for batch in data.val_dataloader() for im in batch])
    for split in ("train", "val"):
        a, b = seen[split]
        assert len(a) == len(b) or split == "val"
        assert not set(a) & set(b), split  # disjoint
        assert sorted(a + b) == sorted(im.tobytes() for im in arrays[split]), split  # every image exactly once


def test_a_mid_epoch_resume_continues_with_the_next_unseen_images(shards) -> None:
    """State after k consumed batches while one more was prefetched (as Lightning does): a new loader loading it
    yields first the prefetched, unconsumed batch, and the epoch holds every image once."""
    out, arrays = shards
    first = StreamingDataModule(str(out), batch_size=2, shuffle_seed=5)
    first.setup("fit")
    loader = first.train_dataloader()
    assert isinstance(loader, ResumableStreamingLoader)
    taken = batches(loader, limit=4)  # 4 yielded ...
    loader.consumed = 3  # ... 3 consumed by the training loop, one prefetched
    state = loader.state_dict()
    second = StreamingDataModule(str(out), batch_size=2, shuffle_seed=5)
    second.setup("fit")
    resumed = second.train_dataloader()
    resumed.load_state_dict(state)
    rest = batches(resumed)
    assert torch.equal(rest[0], taken[3])  # the prefetched batch is not lost
    images = [key(im) for batch in taken[:3] + rest for im in batch]
    assert sorted(images) == sorted(im.tobytes() for im in arrays["train"])  # every image once in the epoch
    whole = StreamingDataModule(str(out), batch_size=2, shuffle_seed=5)
    whole.setup("fit")
    assert [key(im) for b in batches(whole.train_dataloader()) for im in b] == images  # the uninterrupted order


class Recorder(L.LightningModule):
    """Records the training batches it sees (a scalar parameter, so the optimiser has something to step) and saves
    a checkpoint at the end of step ``save_at`` (as ``ModelCheckpoint(every_n_train_steps=...)`` does)."""

    def __init__(self, path: Path, save_at: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[bytes] = []
        self.path, self.save_at = path, save_at

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.extend(key(im.cpu()) for im in batch)
        return self.weight * batch.float().mean()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step == self.save_at:
            self.trainer.save_checkpoint(self.path)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_lightning_fit_stopped_mid_epoch_resumes_with_the_next_unseen_images(shards, tmp_path: Path) -> None:
    """A checkpoint saved after 3 of the 8 steps of an epoch (Lightning has already fetched the 4th batch then);
    the fit resumed from it sees exactly the 5 remaining batches of the uninterrupted run, in its order."""
    out, arrays = shards
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, max_steps=8)  # fmt: skip
    whole = Recorder(tmp_path / "mid.ckpt", save_at=3)
    L.Trainer(**options).fit(whole, datamodule=StreamingDataModule(str(out), batch_size=2, shuffle_seed=1))
    assert sorted(whole.seen) == sorted(im.tobytes() for im in arrays["train"])  # one epoch: every image once
    resumed = Recorder(tmp_path / "unused.ckpt")
    data = StreamingDataModule(str(out), batch_size=2, shuffle_seed=1)
    L.Trainer(**options).fit(resumed, datamodule=data, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.seen == whole.seen[6:]  # the next unseen images, none lost, none repeated


def test_a_folder_gives_the_folder_modules_split_and_class_labels(tmp_path: Path) -> None:
    images = unique_images(12, 9).transpose(0, 2, 3, 1)
    for i, image in enumerate(images):
        folder = tmp_path / "images" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    main([str(tmp_path / "images"), str(tmp_path / "out"), "--val_fraction", "0.25", "--test_fraction", "0.25",
          "--workers", "1", "--start_method", "fork"])  # fmt: skip
    reference = ImageFolderDataModule(str(tmp_path / "images"), val_fraction=0.25, test_fraction=0.25)
    from litdata import StreamingDataset

    metadata = json.loads((tmp_path / "out" / "mulan_shards.json").read_text())
    assert metadata["classes"] == ["cats", "dogs"] and metadata["image_shape"] == [3, 4, 4]
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert record["splits"] == reference.split_record()["splits"]
    for split in ("train", "val", "test"):
        dataset = StreamingDataset(str(tmp_path / "out" / split))
        items = [dataset[i] for i in range(len(dataset))]
        files = reference.files[split]
        assert [it["image"].tobytes() for it in items] == [
            images[int(f.stem)].transpose(2, 0, 1).tobytes() for f in files
        ]
        assert [it["label"] for it in items] == [0 if f.parent.name == "cats" else 1 for f in files]


def test_a_missing_shard_description_names_the_file_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"mulan_shards\.json.*python -m mulan\.lightning\.data\.shards"):
        StreamingDataModule(str(tmp_path))
