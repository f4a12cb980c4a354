"""dsxfer: prompt- and alignment-based cross-lingual transfer for pretrained multilingual models."""

__version__ = "0.1.0"

from dsxfer.errors import ConfigError, DataError, DsxferError  # noqa: E402

__all__ = ["ConfigError", "DataError", "DsxferError", "__version__"]
