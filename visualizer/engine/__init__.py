"""The engine: models, samplers, the owned denoising loop, decoding.

Importing it sets one logging filter (standard `logging` only: neither transformers nor diffusers is imported here).
Without torchvision, transformers 5 warns once per class when a module imports an image processor by its old name,
and diffusers' pipeline and IP-Adapter modules import two (CLIPImageProcessor, SiglipImageProcessor) whenever a
pipeline loads. transformers then uses the PIL version, which is what these pipelines used before, and this project
runs no image encoder: the filter drops exactly those notices; every other message of that logger passes.
"""
import logging


class _TorchvisionFallbackNotice(logging.Filter):
    """False for transformers' "`XImageProcessor` requires torchvision (not installed); falling back to
    `XImageProcessorPil` ..." notice (transformers/utils/import_utils.py), True for any other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("requires torchvision (not installed); falling back to" in message
                    and "ImageProcessorPil" in message)


# the logger transformers.utils.import_utils logs on (logging.get_logger(__name__)): the same object once it loads
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())
