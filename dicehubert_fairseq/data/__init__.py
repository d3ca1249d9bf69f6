"""File formats (fairseq's manifests, label files, dictionaries; our soft labels) and checks."""

from .files import (  # noqa: F401
    Manifest,
    SoftLabels,
    SoftLabelWriter,
    atomic_write,
    read_dictionary_symbols,
    read_manifest,
    soft_label_paths,
    write_dictionary,
)
