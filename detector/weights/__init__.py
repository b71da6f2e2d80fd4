"""Weight files: the canonical format, converters from the published formats, the registry.

Typical use::

    from butd.detector import weights
    path = weights.resolve("airsplay-attr-36")      # or a path to a .safetensors file
    loaded = weights.load(path)                      # keys and shapes checked against the spec
    detector.load_state_dict(loaded.state_dict)

``fetch`` (httpx) is imported from ``butd.detector.weights.fetch`` on demand.
"""

from butd.detector.weights.canonical import (
    LoadedWeights,
    WeightsError,
    canonical_shapes,
    check_shapes,
    file_sha256,
    is_canonical_file,
    load,
    read_metadata,
    save_canonical,
)
from butd.detector.weights.formats import (
    CONVERTIBLE_FORMATS,
    Converted,
    convert,
    convert_airsplay,
    convert_caffe,
    convert_hf,
    convert_milvlg,
)
from butd.detector.weights.formats_caffe import read_caffemodel
from butd.detector.weights.formats_read import detect_format, read_source
from butd.detector.weights.registry import (
    REGISTRY,
    RegistryEntry,
    default_weights_dir,
    get_entry,
    load_vocab,
    resolve,
    vocab_synonyms,
)

__all__ = [
    "CONVERTIBLE_FORMATS",
    "REGISTRY",
    "Converted",
    "LoadedWeights",
    "RegistryEntry",
    "WeightsError",
    "canonical_shapes",
    "check_shapes",
    "convert",
    "convert_airsplay",
    "convert_caffe",
    "convert_hf",
    "convert_milvlg",
    "default_weights_dir",
    "detect_format",
    "file_sha256",
    "get_entry",
    "is_canonical_file",
    "load",
    "load_vocab",
    "read_caffemodel",
    "read_metadata",
    "read_source",
    "resolve",
    "save_canonical",
    "vocab_synonyms",
]
