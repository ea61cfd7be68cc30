"""LightningDataModules, one file per data source. Every batch is uint8 ``(B, C, H, W)`` (see :mod:`.base`)."""

from mulan.data import UInt8Images, check_images, digits_images, photo_crops, split_indices
from mulan.lightning.data.base import EpochSeededRandomSampler, ImageDataModule
from mulan.lightning.data.cifar import CIFAR10DataModule
from mulan.lightning.data.embedded import EmbeddedDataModule, SyntheticDataModule
from mulan.lightning.data.imagenet import ImageNet32DataModule
from mulan.lightning.data.mnist import MNISTDataModule

__all__ = [
    "ImageDataModule",
    "EpochSeededRandomSampler",
    "CIFAR10DataModule",
    "MNISTDataModule",
    "ImageNet32DataModule",
    "EmbeddedDataModule",
    "SyntheticDataModule",
    "UInt8Images",
    "check_images",
    "split_indices",
    "digits_images",
    "photo_crops",
]
