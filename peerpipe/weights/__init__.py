"""Weights between peers: manifests (a hash per tensor), the cache of fetched layers, serving
them and fetching them (docs/weights.md)."""

from peerpipe.weights.errors import DiskSpaceError, FetchError, HolderGone, ManifestError, WeightsError
from peerpipe.weights.local_copy import build_manifest, copy_manifest
from peerpipe.weights.manifest import Manifest
from peerpipe.weights.node import NodeWeights
from peerpipe.weights.store import Store, store_root

__all__ = [
    "DiskSpaceError",
    "FetchError",
    "HolderGone",
    "Manifest",
    "ManifestError",
    "NodeWeights",
    "Store",
    "WeightsError",
    "build_manifest",
    "copy_manifest",
    "store_root",
]
