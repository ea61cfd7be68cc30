"""CIFAR-10, read with torchvision from files on disk (never downloaded at run time unless asked)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from mulan.data import nhwc_to_nchw
from mulan.lightning.data.base import ImageDataModule, Split, ensure_files

CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 as uint8 images (3, 32, 32).

    train = the 50k training images; val = test = the 10k test images (VDM and
    MuLAN report test-set bits/dim). Files are read with torchvision from
    ``<root>/cifar-10-batches-py/``.
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip)
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = download

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def _missing_message(self) -> str:
        folder = self.root / "cifar-10-batches-py"
        missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
        return (
            f"CIFAR10DataModule: CIFAR-10 not found. Expected the directory {folder}/ with the files "
            f"data_batch_1 .. data_batch_5, test_batch and batches.meta (missing: {', '.join(missing)}).\n"
            f"Get it by extracting cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
            f"into {self.root}/, or pass `--data.init_args.download true` on a machine with internet."
        )

    def _files_present(self) -> bool:
        return all((self.root / "cifar-10-batches-py" / f).is_file() for f in CIFAR10_FILES)

    def prepare_data(self) -> None:
        """Download CIFAR-10 if ``download`` and the files are missing."""
        self._ensure_files()

    def _ensure_files(self) -> None:
        from torchvision import datasets

        def fetch() -> object:
            return datasets.CIFAR10(str(self.root), train=True, download=True)

        ensure_files(self._files_present, self.download, fetch, self._missing_message)

    def _load_split(self, split: Split) -> Tensor:
        return self._read(train=split == "train")

    def _read(self, train: bool) -> Tensor:
        from torchvision import datasets

        self._ensure_files()
        try:
            data = datasets.CIFAR10(str(self.root), train=train, download=False).data
        except RuntimeError as error:  # torchvision's md5 check failed
            raise FileNotFoundError(
                f"CIFAR10DataModule: the files under {self.root / 'cifar-10-batches-py'}/ are corrupted "
                f"({error}). Delete them and extract cifar-10-python.tar.gz again."
            ) from error
        return nhwc_to_nchw(data)
