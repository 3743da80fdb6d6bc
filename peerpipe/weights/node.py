"""One node's weights: the copy it was started with (``--model``), the copies it fetched, and
how a stage gets the tensors it needs before it loads (``prepare``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peerpipe.compute import run_compute
from peerpipe.engine.random_weights import is_random
from peerpipe.logs import Report, log_reporter
from peerpipe.room import Send
from peerpipe.weights.errors import ManifestError
from peerpipe.weights.fetch import Fetcher
from peerpipe.weights.gguf_store import GGUFStore
from peerpipe.weights.local_copy import Located, copy_manifest, locations
from peerpipe.weights.manifest import Manifest
from peerpipe.weights.serve import WeightServer
from peerpipe.weights.store import Store
from peerpipe.weights.stores import existing_store, open_store

log = logging.getLogger(__name__)
Range = tuple[int, int]


class NodeWeights:
    def __init__(
        self,
        send: Send,
        model_dir: Path | None,
        *,
        report: Report | None = None,
        corrupt: bool = False,
        cache: Path | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.cache = cache  # where fetched copies go (None: cache_dir()/models)
        self.report = report or log_reporter(log)
        self.fetcher = Fetcher(send, self.report)
        self.server = WeightServer(send, corrupt=corrupt)
        self._local: tuple[Manifest, dict[str, Located]] | None = None
        self._hashed = False
        self._told: set[str] = set()  # copies this node was told are not its own --model

    async def local(self) -> tuple[Manifest, dict[str, Located]] | None:
        """This node's own copy (a folder or a GGUF): its manifest (hashed once, then cached) and
        where each tensor lies."""
        if not self._hashed:
            self._hashed = True
            # A random folder (engine/random_weights.py) has nothing to share: each node draws its own.
            if self.model_dir is not None and self.model_dir.exists() and not is_random(self.model_dir):
                path = self.model_dir
                progress = _marks(self.report, f"hashing {path.name} to share it with peers")
                manifest = await run_compute(copy_manifest, path, path.stem if path.is_file() else path.name, progress)
                self._local = manifest, locations(path)
                self.server.add(manifest, self._local[1].get)
        return self._local

    async def local_id(self) -> str:
        local = await self.local()
        return local[0].id if local is not None else ""

    async def held_layers(self, manifest_id: str) -> tuple[int, ...]:
        """Layers of copy ``manifest_id`` this node holds verified."""
        if not manifest_id:
            return ()
        local = await self.local()
        if local is not None and local[0].id == manifest_id:
            return tuple(sorted(local[0].layers()))
        store = existing_store(manifest_id, self.cache)
        return tuple(store.held_layers()) if store is not None else ()

    async def prepare(
        self,
        manifest_id: str,
        ranges: Sequence[Range],
        holders: Sequence[str],
        what: str,
        check: Callable[[Any], None] | None = None,
    ) -> Path:
        """The folder (or GGUF file) to load ``ranges`` of copy ``manifest_id`` from: this node's
        own when it is that copy, else the cache, after fetching whatever of those layers it lacks. ``check``
        sees the model's config before a tensor is fetched (and may refuse: it does not fit)."""
        local = await self.local()
        if local is not None and local[0].id == manifest_id:
            assert self.model_dir is not None
            return self.model_dir
        if local is not None and manifest_id not in self._told:
            self._told.add(manifest_id)
            assert self.model_dir is not None
            self.report(
                f"--model {self.model_dir.name} is not the room's model ({manifest_id[:12]}): this node serves the "
                "room's, fetched from its peers (any tensor the two share is copied from yours)"
            )
        store = existing_store(manifest_id, self.cache)
        if store is None:
            store = open_store(await self.fetcher.manifest(manifest_id, holders), self.cache)
        store.open()
        self.server.add(store.manifest, store.locate)
        try:
            await self.fetcher.fetch_files(store, holders)
            cfg, names = _stage_names(store, ranges, manifest_id)
            if check is not None:
                check(cfg)
            store.check_space(names)
            await self.fetcher.fetch(store, names, holders, local=local, what=what)
        finally:
            store.close()
        return store.load_path


def _stage_names(store: Store | GGUFStore, ranges: Sequence[Range], manifest_id: str) -> tuple[Any, list[str]]:
    """The model's config, checked against the manifest, and the tensors ``ranges`` need (by the
    manifest's names: Hugging Face ones, or a GGUF's own)."""
    from peerpipe.engine.config import ModelConfig
    from peerpipe.engine.errors import ModelLoadError
    from peerpipe.engine.loader import check_checkpoint, stage_tensor_names

    try:
        cfg = ModelConfig.from_dir(store.load_path)
        if isinstance(store, GGUFStore):
            from peerpipe.engine.gguf_file import open_gguf

            store.check_header()
            gguf = open_gguf(str(store.load_path))
            shapes, own = {n: gguf.shape(n) for n in gguf.tensors}, {n: t.name for n, t in gguf.tensors.items()}
        else:
            shapes = {t.name: t.shape for t in store.manifest.tensors}
            own = {n: n for n in shapes}
        check_checkpoint(cfg, shapes, f"the room's manifest {manifest_id}")
    except ModelLoadError as exc:
        raise ManifestError(f"the room's manifest does not match its config: {exc}") from exc
    wanted = {n for start, end in ranges for n in stage_tensor_names(cfg, start, end, set(shapes))}
    return cfg, sorted(own[n] for n in wanted)

def _marks(report: Report, what: str):  # type: ignore[no-untyped-def]
    marks = [25, 50, 75, 100]

    def progress(done: int, total: int) -> None:
        pct = 100 * done // max(1, total)
        while marks and pct >= marks[0]:
            report(f"{what}: {marks.pop(0)}%")

    return progress
