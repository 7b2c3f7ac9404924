"""Training data: image-text pairs from webdataset shards or a captioned image folder."""
from .images import ImageTextBatches, ImageTextData, Preprocess
from .sources import FolderSource, ShardSource

__all__ = ["FolderSource", "ImageTextBatches", "ImageTextData", "Preprocess", "ShardSource"]
