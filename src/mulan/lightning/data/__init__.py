"""LightningDataModules, one file per data source. Every batch is uint8 ``(B, C, H, W)`` (see :mod:`.base`)."""

from mulan.data import UInt8Images, check_images, digits_images, photo_crops, split_indices
from mulan.lightning.data.arrays import ArrayDataModule
from mulan.lightning.data.base import ImageDataModule, ResumableLoader, ResumableSampler
from mulan.lightning.data.cifar import CIFAR10DataModule
from mulan.lightning.data.embedded import EmbeddedDataModule, SyntheticDataModule
from mulan.lightning.data.folder import ImageFolderDataModule
from mulan.lightning.data.imagenet import ImageNet32DataModule
from mulan.lightning.data.mnist import MNISTDataModule
from mulan.lightning.data.streaming import StreamingDataModule
from mulan.lightning.data.superres import SuperResolutionDataModule

__all__ = [
    "ImageDataModule",
    "ResumableSampler",
    "ResumableLoader",
    "CIFAR10DataModule",
    "MNISTDataModule",
    "ImageNet32DataModule",
    "EmbeddedDataModule",
    "SyntheticDataModule",
    "ImageFolderDataModule",
    "ArrayDataModule",
    "SuperResolutionDataModule",
    "UInt8Images",
    "check_images",
    "split_indices",
    "digits_images",
    "photo_crops",
    "StreamingDataModule",
]
